"""Job ``ensemble``: EVA ensemble of the main ``model`` with ``ensemble.aux`` models on a task.

Writes each member's and the ensemble's score on the same examples with 95% intervals, the paired
difference ensemble − best member, gate and filter statistics, alignment quality and step times
(:func:`fusionlab.ensemble.evaluate_ensemble`); predictions go to predictions.jsonl.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.ensemble import EnsembleConfig, Member, align_members, evaluate_ensemble
from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker, task_inputs
from fusionlab.models import cache_dir, load_model

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    ens: EnsembleConfig = OmegaConf.to_object(cfg.ensemble)
    specs = [OmegaConf.to_object(cfg.model)] + [dataclasses.replace(s, name=n) for n, s in ens.aux.items()]
    if len({s.name for s in specs}) != len(specs):  # the main model may also be an aux model under its own name
        specs = [dataclasses.replace(s, name=f"{s.name}_{i}") for i, s in enumerate(specs)]
    align_method = OmegaConf.to_object(cfg.align_method) if cfg.get("align_method") is not None else "vecmap_csls"
    task, examples, shots = task_inputs(cfg)
    max_new_tokens = OmegaConf.to_object(cfg.generation).new_tokens_for(task.max_new_tokens)

    with make_tracker(cfg, output_dir) as tracker:
        loaded = [load_model(s) for s in specs]
        alignments = align_members(loaded[0], loaded[1:], align_method, {"progress": True},
                                   Path(ens.cache_dir) if ens.cache_dir else cache_dir() / "align", ens.rebuild_alignment)
        step = iter(range(10**9))  # one increasing step across members and ensemble (W&B drops steps that go back)
        report = evaluate_ensemble(
            [Member(s.name, m, t, s.use_chat_template) for s, (m, t) in zip(specs, loaded)], alignments, task.name,
            examples, ens, max_new_tokens, shots=shots, batch_size=ens.batch_size, eval_members=ens.eval_members,
            bootstrap_samples=ens.bootstrap_samples, seed=cfg.get("seed") or 0,
            on_batch=lambda tag, out: tracker.log({f"{tag}_batch_tokens_per_s": out.tokens_per_s,
                                                   **{f"{tag}_{k}": v for k, v in out.stats.items()}}, step=next(step)))
        write_jsonl(output_dir / "predictions.jsonl", report.rows)
        tracker.log(report.metrics)
        tracker.log_table("predictions", report.rows)
        tracker.summary(report.metrics)
    log.info("ensemble on %s (n=%d):\n%s", task.name, len(examples), report.table())
    return report.metrics
