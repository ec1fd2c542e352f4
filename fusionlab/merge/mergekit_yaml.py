"""Run an existing mergekit YAML with fusionlab's engine (``merge.mergekit_config=path.yml``).

Supported: ``merge_method``, ``base_model``, ``models`` (with ``parameters``: scalars, layer
gradients, ``filter`` lists), global ``parameters``, ``dtype``/``out_dtype``, ``tokenizer_source``
(``base`` or a model). Not supported (clear error): ``slices``/``modules`` (layer surgery), LoRA
``model+lora`` references, ``tokenizer_source: union`` and the ``tokenizer`` block.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from fusionlab.errors import FusionlabError
from fusionlab.merge.config import MergeConfig

log = logging.getLogger(__name__)

_UNSUPPORTED = ("slices", "modules", "tokenizer")
_IGNORED = ("name", "chat_template")


def _model_ref(ref: Any) -> str:
    if isinstance(ref, dict):  # mergekit's long form {model: {path: ...}, lora: ...}
        if ref.get("lora"):
            raise FusionlabError(f"LoRA model references are not supported: {ref!r}; merge the LoRA first.")
        inner = ref.get("model", ref)
        ref = inner.get("path") if isinstance(inner, dict) else inner
    ref = str(ref)
    if "+" in ref:
        raise FusionlabError(f"LoRA model reference {ref!r} (model+lora) is not supported; merge the LoRA first.")
    return ref


def load_mergekit_config(path: str | Path, output: str | Path, **overrides: Any) -> MergeConfig:
    """Translate a mergekit YAML into a :class:`MergeConfig` writing to ``output``."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FusionlabError(f"mergekit config {str(p)!r} does not exist; check merge.mergekit_config.")
    raw = yaml.safe_load(p.read_text()) or {}
    for key in _UNSUPPORTED:
        if raw.get(key):
            raise FusionlabError(f"mergekit option {key!r} in {p} is not supported by fusionlab's engine "
                                 "(only whole-model merges); run it with mergekit itself.")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source", *_IGNORED}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise FusionlabError(f"Unknown mergekit option(s) {unknown} in {p}; fusionlab understands {sorted(known)}.")
    if raw.get("tokenizer_source") == "union":
        raise FusionlabError("tokenizer_source: union is not supported (it rebuilds embeddings); use base or a model.")
    if "merge_method" not in raw:
        raise FusionlabError(f"{p} has no merge_method.")
    models = [{"model": _model_ref(m["model"]), "parameters": m.get("parameters") or {}} for m in raw.get("models") or []]
    d = {
        "method": raw["merge_method"],
        "models": models,
        "base": _model_ref(raw["base_model"]) if raw.get("base_model") else None,
        "parameters": raw.get("parameters") or {},
        "dtype": raw.get("out_dtype") or raw.get("dtype") or "auto",
        "output": str(output),
        "tokenizer_source": raw.get("tokenizer_source"),
    }
    if not models and d["base"]:
        raise FusionlabError(f"{p} lists no models.")
    d.update(overrides)
    return MergeConfig.from_dict(d)
