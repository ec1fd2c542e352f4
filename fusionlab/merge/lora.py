"""LoRA extraction: the rank-r adapter (peft format) that best approximates fine-tuned − base per linear layer.

For each linear weight of the transformer layers, Δ = W_ft − W_base = U S Vᵀ; the truncated SVD
B = U_r S_r^½, A = S_r^½ V_rᵀ is the best rank-r approximation in Frobenius norm (Eckart–Young), so its
relative error ‖Δ − BA‖ / ‖Δ‖ = √(Σ_{i>r} s_i²) / √(Σ s_i²) is reported per layer. The adapter is
written as peft writes one (``adapter_config.json``: r, lora_alpha = r so the scale is 1, target
module names; ``adapter_model.safetensors``: ``base_model.model.<module>.lora_A/B.weight``) and loads
with ``peft.PeftModel.from_pretrained``. What a LoRA cannot hold — changed embeddings, norms, biases —
is reported as ``lora_uncaptured_rel`` (its share of ‖τ‖), not silently dropped.

:func:`resolve_lora` turns an adapter dir into a full checkpoint (base + adapter, peft's
``merge_and_unload``, cached), so a LoRA is accepted wherever a fine-tuned model is (the chat vector).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import (atomic_dir, check_not_an_input, check_output_path, intact_cache_entry, read_json_object,
                          write_manifest)
from fusionlab.merge.io import AUX_FILES, CheckpointReader, ShardWriter, is_embedding
from fusionlab.merge.derive import DeriveSpec, PerplexityEval
from fusionlab.models.resolve import DERIVED_PREFIX, resolve_checkpoint, torch_dtype

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_LAYER = re.compile(r"\.layers?\.\d+\.")


def lora_targets(reader: CheckpointReader, modules: list[str] | None = None) -> list[str]:
    """The weights a LoRA adapts: 2-D ``*.weight`` tensors inside the transformer layers (not embeddings),
    or those whose module name ends with one of ``modules`` (e.g. ``["q_proj", "v_proj"]``)."""
    out = []
    for name in reader.names:
        if not name.endswith(".weight") or len(reader.shape[name]) != 2 or is_embedding(name):
            continue
        module = name.removesuffix(".weight")
        if modules is None and _LAYER.search(name) or modules is not None and module.rsplit(".", 1)[-1] in modules:
            out.append(name)
    return out


def extract_lora(base: str | Path, finetuned: str | Path, output: str | Path, rank: int, *,
                 modules: list[str] | None = None, dtype: str = "float32", overwrite: bool = False,
                 derived: Any = None) -> dict[str, Any]:
    """Write the rank-``rank`` LoRA of ``finetuned`` − ``base`` to ``output``; returns the errors per layer
    (``lora_err/<module>``: relative Frobenius), their mean and max, and the uncaptured share of τ."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise FusionlabError(f"LoRA rank={rank!r}: the rank must be an integer >= 1.")
    out_dtype = torch_dtype(dtype, "extract_lora.dtype")
    check_output_path(output, overwrite, key="extract_lora.output")
    rb = CheckpointReader(resolve_checkpoint(str(base), derived), f"base model {str(base)!r}")
    rf = CheckpointReader(resolve_checkpoint(str(finetuned), derived), f"fine-tuned model {str(finetuned)!r}")
    check_not_an_input(output, [(rb.label, rb.dir), (rf.label, rf.dir)], key="extract_lora.output")
    if rb.path.resolve() == rf.path.resolve():
        raise FusionlabError(f"extract_lora.finetuned and extract_lora.base are the same checkpoint ({rf.path}): every "
                             "delta is zero, there is nothing to extract; give the fine-tuned model.")
    targets = lora_targets(rf, modules)
    if not targets:
        raise FusionlabError(f"No linear layer of {rf.label} matches modules={modules!r}; name module suffixes such "
                             "as q_proj, v_proj (or leave modules unset for every linear layer).")
    problems = []
    for name in rf.names:
        stored = rb.resolve_name(name)
        if stored is None:
            problems.append(f"{name!r} is missing from {rb.label}")
        elif rb.shape[stored] != rf.shape[name]:
            problems.append(f"{name!r} is {list(rb.shape[stored])} in the base but {list(rf.shape[name])} fine-tuned")
    too_small = [f"{n} ({'×'.join(map(str, rf.shape[n]))}, rank {min(rf.shape[n])})" for n in targets
                 if rank > min(rf.shape[n])]
    if too_small:
        problems.append(f"rank={rank} is above the rank of {len(too_small)} layer(s): {', '.join(too_small[:4])}"
                        f"{' ...' if len(too_small) > 4 else ''}; use rank <= {min(min(rf.shape[n]) for n in targets)}"
                        " or restrict modules")
    if problems:
        raise FusionlabError("Cannot extract a LoRA: " + "; ".join(problems) + ".")
    metrics: dict[str, Any] = {}
    entries = []
    for name in targets:
        out_f, in_f = rf.shape[name]
        module = PEFT_PREFIX + name.removesuffix(".weight")
        entries += [(f"{module}.lora_A.weight", (rank, in_f), out_dtype),
                    (f"{module}.lora_B.weight", (out_f, rank), out_dtype)]
    target_set = set(targets)
    captured_sq, uncaptured_sq = 0.0, 0.0
    with atomic_dir(output, overwrite=overwrite) as tmp:
        w = ShardWriter(tmp, entries, max_shard_bytes=2**62, metadata={"format": "pt"})  # peft reads one file
        try:
            for name in rf.names:
                ft, b = rf.get(name), rb.get(rb.resolve_name(name))  # finite (CheckpointReader.get refuses NaN/inf)
                delta = (ft - b).double()
                rf.release(name)
                rb.release(rb.resolve_name(name))
                if name not in target_set:
                    uncaptured_sq += float(delta.pow(2).sum())
                    continue
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                root = s[:rank].sqrt()
                module = name.removesuffix(".weight")
                w.write(f"{PEFT_PREFIX}{module}.lora_A.weight", (root[:, None] * vh[:rank]).to(out_dtype))
                w.write(f"{PEFT_PREFIX}{module}.lora_B.weight", (u[:, :rank] * root).to(out_dtype))
                total = float(s.pow(2).sum())
                captured_sq += total
                metrics[f"lora_err/{module}"] = math.sqrt(float(s[rank:].pow(2).sum()) / total) if total else 0.0
            (written,) = w.finish()
        finally:
            w.close()
            rf.close()
            rb.close()
        written.rename(tmp / ADAPTER_WEIGHTS)
        modules_out = sorted({n.removesuffix(".weight").rsplit(".", 1)[-1] for n in targets})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
                  "target_modules": modules_out, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                  "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                  "base_model_name_or_path": str(resolve_checkpoint(str(base), derived)), "rank_pattern": {},
                  "alpha_pattern": {}, "layers_to_transform": None}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        errs = [v for k, v in metrics.items() if k.startswith("lora_err/")]
        summary = {"lora_rank": rank, "lora_layers": len(targets), "lora_err_mean": sum(errs) / len(errs),
                   "lora_err_max": max(errs),
                   "lora_uncaptured_rel": math.sqrt(uncaptured_sq / (captured_sq + uncaptured_sq))
                   if captured_sq + uncaptured_sq else 0.0}
        (tmp / "fusionlab_lora.json").write_text(json.dumps({**summary, **metrics}, indent=2) + "\n")
    return {**summary, **metrics, "lora_output": str(output)}


def is_lora_dir(path: str | Path) -> bool:
    p = Path(path)
    return p.is_dir() and (p / ADAPTER_CONFIG).is_file()


def resolve_lora(path: str | Path, base: str | Path | None = None) -> Path:
    """``path`` itself, or for a peft LoRA dir the full checkpoint base + adapter (``merge_and_unload``), built
    once under ``$FUSIONLAB_CACHE/lora_merged/<key>`` (``base``: default the adapter's base_model_name_or_path)."""
    from fusionlab.models.embedded import cache_dir

    path = Path(path)
    if not is_lora_dir(path):
        return path
    cfg = read_json_object(path / ADAPTER_CONFIG, "LoRA adapter config")
    base_ref = str(base or cfg.get("base_model_name_or_path") or "")
    if not base_ref:
        raise FusionlabError(f"LoRA {str(path)!r} names no base model (base_model_name_or_path); give its base.")
    base_dir = resolve_checkpoint(base_ref)
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FusionlabError(f"LoRA {str(path)!r} has no {ADAPTER_WEIGHTS}; it is not a (safetensors) peft adapter.")
    h = hashlib.sha256(str(Path(base_dir).resolve()).encode())
    h.update((path / ADAPTER_CONFIG).read_bytes())
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    out = cache_dir() / "lora_merged" / h.hexdigest()[:16]
    if intact_cache_entry(out, "merged LoRA"):
        return out
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    with atomic_dir(out, overwrite=True, owned=True) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in AUX_FILES:  # the base's tokenizer (and chat template) files, where it has them
            if (Path(base_dir) / name).exists() and not (tmp / name).exists():
                shutil.copy2(Path(base_dir) / name, tmp / name)
        (tmp / "fusionlab_lora_source.json").write_text(json.dumps({"lora": str(path), "base": str(base_dir)}) + "\n")
        write_manifest(tmp)
    log.info("Merged LoRA %s into %s -> %s", path, base_dir, out)
    return out


@dataclass
class ExtractLoraConfig:
    """The ``extract_lora:`` node (job ``extract_lora``, conf/experiment/extract_lora.yaml)."""

    base: str  # the model the fine-tune started from (a dir, an embedded name, derived:<name>)
    finetuned: str  # the fine-tuned model
    rank: int = 16
    modules: list[str] | None = None  # module name suffixes (q_proj, ...); null: every linear layer of the blocks
    output: str | None = None  # default: <run dir>/lora
    dtype: str = "float32"  # of the adapter's tensors
    overwrite: bool = False
    derive: dict[str, DeriveSpec] = field(default_factory=dict)  # name -> fine-tune of base, as derived:<name>
    eval: PerplexityEval | None = None  # perplexity of base, finetuned and base + LoRA

    def __post_init__(self) -> None:
        from fusionlab.merge.config import build

        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise FusionlabError(f"extract_lora.rank={self.rank!r}: the rank must be an integer >= 1.")
        torch_dtype(self.dtype, "extract_lora.dtype")
        self.derive = {n: build(DeriveSpec, s, f"extract_lora.derive.{n}") for n, s in self.derive.items()}
        self.eval = build(PerplexityEval, self.eval, "extract_lora.eval") if self.eval is not None else None
        for ref in (self.base, self.finetuned):
            if ref.startswith(DERIVED_PREFIX) and ref.removeprefix(DERIVED_PREFIX) not in self.derive:
                raise FusionlabError(f"Model {ref!r} is not defined under extract_lora.derive "
                                     f"(defined: {sorted(self.derive)}).")
