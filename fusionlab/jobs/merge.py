"""Job ``merge``: derive inputs if asked, merge (fusionlab engine), score inputs and output by perplexity.

Config (``merge:``; see conf/experiment/merge.yaml and conf/merge_method/*.yaml):

- ``method``, ``base``, ``models`` ([{model, parameters}]), ``parameters``, ``dtype``, ``device``,
  ``shard_size``, ``tokenizer_source``, ``seed``, ``overwrite``: :class:`fusionlab.merge.MergeConfig`;
- ``output``: where the merged checkpoint goes (default ``<output_dir>/merged``);
- ``mergekit_config``: a mergekit YAML to run instead of ``method``/``base``/``models``/``parameters``;
- ``derive``: {name: {kind, start, stop, steps, lr, batch_size, max_length, seed, data}}: short
  fine-tunes of the base on shipped texts (``kind``: chat | addsub | e2e | gsm8k; ``data``: optional
  user JSONL of that format), cached, referred to as ``derived:<name>`` in base/models;
- ``eval``: {max_length, batch_size, sets: {name: {kind, start, stop, data}}}: perplexity of every
  input and of the merged model on held-out shipped texts → ``ppl/<set>/<model>`` in metrics.json.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import make_tracker, to_dict

log = logging.getLogger(__name__)

DERIVED = "derived:"


def derive_models(base_ref: str, derive: dict[str, Any]) -> dict[str, str]:
    """Run (or reuse from the cache) the fine-tunes named in ``derive``; returns ``derived:<name>`` → dir."""
    from fusionlab.merge import derive as D
    from fusionlab.merge.engine import resolve_checkpoint
    from fusionlab.models.embedded import cache_dir

    if not derive:
        return {}
    base_dir = resolve_checkpoint(base_ref)
    out = {}
    for name, spec in derive.items():
        spec = dict(spec)
        unknown = set(spec) - {"kind", "data", "start", "stop", "steps", "lr", "batch_size", "max_length", "seed"}
        if unknown or "kind" not in spec:
            raise FusionlabError(f"merge.derive.{name} needs kind (+ start, stop, steps, lr, batch_size, max_length, "
                                 f"seed, data); unknown keys: {sorted(unknown)}.")
        log.info("Deriving %s from %s (%s)", name, base_ref, spec)
        kind, data = spec.pop("kind"), spec.pop("data", None)
        start, stop = spec.pop("start", 0), spec.pop("stop", None)
        out[DERIVED + name] = str(D.cached_finetune(base_dir, kind, cache_dir(), start, stop, data, **spec))
    return out


def substitute(ref: Any, derived: dict[str, str]) -> Any:
    if isinstance(ref, str) and ref.startswith(DERIVED):
        if ref not in derived:
            raise FusionlabError(f"Model {ref!r} is not defined under merge.derive (defined: {sorted(derived)}).")
        return derived[ref]
    return ref


def perplexities(models: dict[str, str], spec: dict[str, Any]) -> dict[str, float]:
    """``ppl/<set>/<label>`` for every model and eval set, and ``ppl_mean/<label>`` (geometric mean)."""
    from fusionlab.merge import derive as D
    from fusionlab.merge.engine import resolve_checkpoint

    if not spec or not spec.get("sets"):
        return {}
    metrics: dict[str, float] = {}
    texts = {name: D.load_texts(s["kind"], s.get("start", 0), s.get("stop"), s.get("data")) for name, s in spec["sets"].items()}
    for label, ref in models.items():
        ppl = D.perplexity(resolve_checkpoint(ref), texts, spec.get("max_length", 64), spec.get("batch_size", 4))
        for name, value in ppl.items():
            metrics[f"ppl/{name}/{label}"] = round(value, 4)
        metrics[f"ppl_mean/{label}"] = round(math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), 4)
    return metrics


def label_of(ref: str) -> str:
    return ref.removeprefix(DERIVED) if ref.startswith(DERIVED) else Path(ref).name or ref


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge import MergeConfig, merge
    from fusionlab.merge.mergekit_yaml import load_mergekit_config

    if cfg.get("merge") is None:
        raise FusionlabError("job=merge needs a merge: block; start from +experiment=merge (or sce_merge), "
                             "e.g. +experiment=merge merge.mergekit_config=path.yml.")
    m = dict(to_dict(cfg.merge))
    derive, evaluation, mk = m.pop("derive", None), m.pop("eval", None), m.pop("mergekit_config", None)
    m = {k: v for k, v in m.items() if v is not None}  # unset keys take MergeConfig's defaults
    m.setdefault("output", str(output_dir / "merged"))
    if cfg.get("seed") is not None:
        m.setdefault("seed", int(cfg.seed))
    labels: dict[str, str] = {}  # checkpoint path -> readable name for metrics
    if mk:
        keep = {k: m[k] for k in ("dtype", "device", "shard_size", "seed", "overwrite", "progress") if k in m}
        mc = load_mergekit_config(mk, m["output"], **keep)
    else:
        refs = [m.get("base")] + [mm["model"] if isinstance(mm, dict) else mm for mm in m.get("models") or []]
        derived = derive_models(m.get("base") or _first_model(m), derive or {})
        labels = {substitute(r, derived): label_of(r) for r in refs if r}
        m["base"] = substitute(m.get("base"), derived)
        m["models"] = [{**mm, "model": substitute(mm["model"], derived)} if isinstance(mm, dict) else substitute(mm, derived)
                       for mm in m.get("models") or []]
        if "tokenizer_source" in m:
            m["tokenizer_source"] = substitute(m["tokenizer_source"], derived)
        mc = MergeConfig.from_dict(m)
    from fusionlab.merge import plan

    planned = plan(mc)  # every config error surfaces here, before a tracker or any output exists
    with make_tracker(cfg, output_dir) as tr:
        metrics: dict[str, Any] = {"merge_method": mc.method, **merge(mc, planned)}
        inputs = {"base": mc.base} if mc.base else {}
        inputs.update({labels.get(mm.model, label_of(mm.model)): mm.model for mm in mc.models if mm.model != mc.base})
        ppl = perplexities({**inputs, "merged": mc.output}, evaluation or {})
        metrics.update(ppl)
        if ppl:
            best = min(v for k, v in ppl.items() if k.startswith("ppl_mean/") and k != "ppl_mean/merged")
            metrics["ppl_mean/merged_over_best_input"] = round(ppl["ppl_mean/merged"] / best, 4)
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tr.summary(metrics)
    return metrics


def _first_model(m: dict[str, Any]) -> str:
    models = m.get("models") or []
    if not models:
        raise FusionlabError("merge.models is empty; list the models to merge.")
    first = models[0]
    return first["model"] if isinstance(first, dict) else first
