"""Job ``fusechat_merge``: FuseChat's last stage — SCE-merge the pairwise fusion targets against the pivot.

FuseChat distils the pivot once per source (pivot ⊕ source_j → target_j, same architecture as the
pivot) and then merges the targets in weight space with SCE, base = the pivot. This job does it in
one command:

1. targets: ``fusechat_merge.targets`` (HF dirs of distilled pivots, e.g. ``<distill run>/model``),
   or, when not given, it makes them by calling the ``distill`` job once per entry of
   ``fusechat_merge.pairwise`` (``{name: {rows: [start, stop], set: {dotted.key: value}}}``: the rows of
   ``distill.data.path`` to train on and any distill overrides, e.g. ``distill.pairwise_source``),
   each in ``<output_dir>/pairwise/<name>`` (a finished target is reused on a rerun; an explicit
   ``distill.cache_dir`` gets a sub dir per target);
2. the merge: ``merge.method`` (sce by default, ``merge_method=<name>``) with ``base`` = the pivot
   checkpoint, written to ``<output_dir>/merged`` (fp32 by default: a few distillation steps move the
   weights by less than a bf16 ulp);
3. perplexity of the pivot, every target and the merge on held-out shipped texts (``fusechat_merge.eval``,
   as the merge job's ``eval``) → ``ppl/<set>/<model>``, ``ppl_mean/<model>`` in metrics.json.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import make_tracker, to_dict

log = logging.getLogger(__name__)

KEYS = {"targets", "pairwise", "eval"}


def pivot_checkpoint(spec: dict[str, Any], out: Path) -> Path:
    """The pivot as a safetensors dir: the embedded/HF checkpoint itself, else (random, gguf) saved once to ``out``."""
    from fusionlab.io import atomic_dir
    from fusionlab.merge.engine import resolve_checkpoint
    from fusionlab.models import load_model

    if spec.get("source") == "embedded" or (spec.get("source") == "hf" and spec.get("path")
                                            and Path(spec["path"]).expanduser().is_dir()):
        return resolve_checkpoint(spec["path"])
    if not (out / "config.json").exists():
        model, tok = load_model(spec)
        with atomic_dir(out, overwrite=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
    return out


def make_target(cfg: DictConfig, name: str, entry: dict[str, Any], out: Path) -> tuple[Path, dict[str, Any]]:
    """One pairwise fusion target: the distill job on ``entry``'s rows and overrides, in ``out``."""
    from fusionlab.io import read_jsonl, write_jsonl
    from fusionlab.jobs import distill
    from fusionlab.jobs.distill import _data_path

    unknown = sorted(set(entry) - {"rows", "set"})
    if unknown:
        raise FusionlabError(f"fusechat_merge.pairwise.{name} has unknown key(s) {unknown}; use rows: [start, stop] "
                             "and set: {dotted.distill.key: value}.")
    model_dir = out / "model"
    if (model_dir / "config.json").exists():
        log.info("Pairwise target %s exists (%s): reused", name, model_dir)
        return model_dir, {}
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(sub):
        sub.pop("hydra", None)
        sub.job = "distill"
        sub.paths.output_dir = str(out)  # checkpoints, csv logs and callbacks' outputs go under the sub dir
        if sub.distill.get("cache_dir"):  # one explicit cache dir holds one data set: a sub dir per target
            sub.distill.cache_dir = str(Path(str(sub.distill.cache_dir)) / name)
        for key, value in (entry.get("set") or {}).items():
            OmegaConf.update(sub, key, value, merge=False, force_add=False)
        if entry.get("rows") is not None:
            start, stop = (list(entry["rows"]) + [None])[:2]
            rows = read_jsonl(_data_path(str(sub.distill.data.path)))[start:stop]
            if not rows:
                raise FusionlabError(f"fusechat_merge.pairwise.{name}.rows={entry['rows']} selects no conversation "
                                     f"of {sub.distill.data.path}.")
            out.mkdir(parents=True, exist_ok=True)
            write_jsonl(out / "conversations.jsonl", rows)
            sub.distill.data.path = str(out / "conversations.jsonl")
            sub.distill.data.limit = None
        sub.distill.export_model = True
    metrics = distill.run(sub, out)
    if not (model_dir / "config.json").exists():
        raise FusionlabError(f"The distill run for pairwise target {name!r} wrote no model at {model_dir} (a sharded "
                             "strategy keeps it in the Lightning checkpoint); give fusechat_merge.targets instead.")
    return model_dir, metrics


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.jobs.merge import perplexities
    from fusionlab.merge import MergeConfig, merge, plan

    fm = dict(to_dict(cfg.get("fusechat_merge")) or {})
    unknown = sorted(set(fm) - KEYS)
    if unknown:
        raise FusionlabError(f"Unknown fusechat_merge option(s) {unknown}; valid options are {sorted(KEYS)}.")
    if cfg.get("merge") is None:
        raise FusionlabError("job=fusechat_merge needs merge: (method, parameters); start from +experiment=fusechat_merge.")
    metrics: dict[str, Any] = {}
    targets: dict[str, str] = {}
    if fm.get("targets"):
        for t in fm["targets"]:
            p = Path(str(t)).expanduser()
            if not (p / "config.json").exists():
                raise FusionlabError(f"fusechat_merge.targets entry {str(t)!r} is not an HF checkpoint dir (no "
                                     "config.json); give the distill run's <run dir>/model.")
            targets[p.parent.name if p.name == "model" else p.name] = str(p)
    else:
        pairwise = fm.get("pairwise") or {}
        if not pairwise:
            raise FusionlabError("fusechat_merge needs targets: [dir, ...] (distilled pivots) or a pairwise: "
                                 "{name: {rows, set}} list of distill runs that make them.")
        for name, entry in pairwise.items():
            model_dir, m = make_target(cfg, name, dict(entry or {}), output_dir / "pairwise" / name)
            targets[name] = str(model_dir)
            metrics.update({f"pairwise/{name}/{k}": v for k, v in m.items() if isinstance(v, (int, float, bool))})
    if len(targets) < 2:
        log.warning("Only %d fusion target(s): SCE of one target against the pivot is that target.", len(targets))

    pivot = pivot_checkpoint(to_dict(cfg.model), output_dir / "pivot")
    m = {k: v for k, v in dict(to_dict(cfg.merge)).items() if v is not None}
    m.update({"base": str(pivot), "models": [{"model": d} for d in targets.values()],
              "output": m.get("output") or str(output_dir / "merged")})
    m.setdefault("tokenizer_source", str(pivot))
    mc = MergeConfig.from_dict(m)
    planned = plan(mc)  # config errors before a tracker or any output exists
    with make_tracker(cfg, output_dir) as tr:
        metrics.update({"merge_method": mc.method, "fusion_targets": len(targets), **merge(mc, planned)})
        ppl = perplexities({"pivot": str(pivot), **targets, "merged": mc.output}, fm.get("eval") or {})
        metrics.update(ppl)
        if ppl:
            metrics["ppl_mean/merged_over_pivot"] = round(ppl["ppl_mean/merged"] / ppl["ppl_mean/pivot"], 4)
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tr.summary(metrics)
    return metrics
