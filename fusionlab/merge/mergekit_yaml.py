"""Run an existing mergekit YAML with fusionlab's engine (``merge.mergekit_config=path.yml``).

Translated: ``merge_method``, ``base_model``, ``models`` (with ``parameters``: scalars, layer
gradients, ``filter`` lists), ``slices`` (``sources`` with ``layer_range`` and ``parameters``, a
slice's ``base_model`` and ``parameters``), global ``parameters``, ``dtype`` (the compute dtype, as
in mergekit; unset = the inputs' promoted dtype) and ``out_dtype`` (the output's; unset = the
compute dtype), ``tokenizer_source`` and ``tokenizer`` (where the MergeConfig has them). Refused,
with an error naming the key, before any checkpoint is opened: ``modules`` (per-module merges of
multi-module models), a slice's ``residual_weight``, LoRA ``model+lora`` references,
``chat_template``, and any key mergekit does not define.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fusionlab.errors import FusionlabError
from fusionlab.io import read_yaml
from fusionlab.merge.config import MergeConfig

# mergekit's MergeConfiguration fields fusionlab runs, and those it refuses (with why)
_KNOWN = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
          "tokenizer")
_REFUSED = {"modules": "per-module merges (multi-module models) are not supported; use models or slices",
            "chat_template": "setting a chat template is not supported; edit the merged tokenizer_config.json"}
_SLICE_KEYS, _SOURCE_KEYS = {"sources", "base_model", "parameters", "residual_weight"}, {"model", "layer_range",
                                                                                          "parameters"}


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


def _unknown(given: Any, known: set[str], where: str) -> None:
    if not isinstance(given, dict):
        raise FusionlabError(f"{where} must be a mapping, got {given!r}.")
    extra = sorted(set(given) - known)
    if extra:
        raise FusionlabError(f"Unknown mergekit option(s) {extra} in {where}; mergekit defines {sorted(known)}.")


def _parameters(raw: dict[str, Any], label: str) -> dict[str, Any]:
    value = raw.get("parameters") or {}
    if not isinstance(value, dict):
        raise FusionlabError(f"{label} must be a mapping (name: value), got {value!r}.")
    return value


def _entry(raw: Any, known: set[str], where: str) -> dict[str, Any]:
    """A models[i] / sources[j] entry: a mapping with a model reference."""
    _unknown(raw, known, where)
    if raw.get("model") is None:
        raise FusionlabError(f"{where} has no model; write model: <path or hub id>.")
    return raw


def _slice(raw: Any, where: str) -> dict[str, Any]:
    _unknown(raw, _SLICE_KEYS, where)
    if raw.get("residual_weight") is not None:
        raise FusionlabError(f"mergekit option 'residual_weight' in {where} is not supported; remove it.")
    if not isinstance(raw.get("sources") or [], list):
        raise FusionlabError(f"{where}.sources must be a list of {{model, layer_range}}, got {raw['sources']!r}.")
    sources = []
    for j, src in enumerate(raw.get("sources") or []):
        at = f"{where}.sources[{j}]"
        _entry(src, _SOURCE_KEYS, at)
        span = src.get("layer_range")
        if not (isinstance(span, list) and len(span) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                    for i in span)):
            raise FusionlabError(f"{at}.layer_range must be [start, stop] (two integers), got {span!r}.")
        sources.append({"model": _model_ref(src["model"]), "layer_range": list(span),
                        "parameters": _parameters(src, f"{at}.parameters")})
    return {"sources": sources, "base": _model_ref(raw["base_model"]) if raw.get("base_model") else None,
            "parameters": _parameters(raw, f"{where}.parameters")}


def load_mergekit_config(path: str | Path, output: str | Path, **overrides: Any) -> MergeConfig:
    """Translate a mergekit YAML into a :class:`MergeConfig` writing to ``output`` (no checkpoint is opened)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FusionlabError(f"mergekit config {str(p)!r} does not exist; check merge.mergekit_config.")
    raw = read_yaml(p, "mergekit config")
    if raw is None:
        raise FusionlabError(f"mergekit config {str(p)!r} is empty; give merge_method and models (or slices).")
    _unknown(raw, set(_KNOWN) | set(_REFUSED), str(p))  # a mapping of known keys
    for key in ("models", "slices"):
        if raw.get(key) is not None and not isinstance(raw[key], list):
            raise FusionlabError(f"{p}: {key} must be a list (one '- ...' entry per {key[:-1]}), got {raw[key]!r}.")
    if raw.get("tokenizer") is not None and not isinstance(raw["tokenizer"], dict):
        raise FusionlabError(f"{p}: tokenizer must be a mapping (name: value), got {raw['tokenizer']!r}.")
    for key, why in _REFUSED.items():
        if raw.get(key) is not None:
            raise FusionlabError(f"mergekit option {key!r} in {p}: {why}.")
    if "merge_method" not in raw:
        raise FusionlabError(f"{p} has no merge_method.")
    if bool(raw.get("models")) == bool(raw.get("slices")):
        raise FusionlabError(f"{p} must list exactly one of models or slices (as mergekit requires).")
    fields = {f.name for f in dataclasses.fields(MergeConfig)}
    for key in ("tokenizer_source", "tokenizer"):
        if raw.get(key) is not None and key not in fields:
            raise FusionlabError(f"mergekit option {key!r} in {p} is not supported by this fusionlab; remove it.")
    if raw.get("tokenizer_source") is not None and raw.get("tokenizer") is not None:
        raise FusionlabError(f"{p} sets both tokenizer_source and tokenizer; mergekit allows only one.")
    models = []
    for i, m in enumerate(raw.get("models") or []):
        _entry(m, {"model", "parameters"}, f"{p}: models[{i}]")
        models.append({"model": _model_ref(m["model"]), "parameters": _parameters(m, f"{p}: models[{i}].parameters")})
    d: dict[str, Any] = {
        "method": raw["merge_method"],
        "models": models,
        "slices": [_slice(s, f"{p}: slices[{i}]") for i, s in enumerate(raw.get("slices") or [])],
        "base": _model_ref(raw["base_model"]) if raw.get("base_model") else None,
        "parameters": _parameters(raw, f"{p}: parameters"),
        "compute_dtype": raw.get("dtype") or "auto",
        "dtype": raw.get("out_dtype") or raw.get("dtype") or "auto",
        "output": str(output),
    }
    d.update({k: raw[k] for k in ("tokenizer_source", "tokenizer") if raw.get(k) is not None})
    d.update(overrides)
    return MergeConfig.from_dict(d)
