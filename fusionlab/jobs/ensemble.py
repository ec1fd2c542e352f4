"""Job ``ensemble``: EVA ensemble of the main ``model`` with ``ensemble.aux`` models on a task.

First a compatibility check on demonstration-free dev examples (alignment P@1 and coverage, each member's
warm-up score; a warning names a member likely to hurt) and, with ``ensemble.weights_from=dev_score``,
linear_sum weights from the members' dev scores; then each member's and the ensemble's score on the same
examples with 95% intervals, the paired difference ensemble − best member, gate and filter statistics,
alignment quality and step times (:func:`fusionlab.ensemble.evaluate_ensemble`); predictions go to
predictions.jsonl.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.ensemble import EnsembleConfig, Member, align_members, evaluate_ensemble
from fusionlab.ensemble.evaluation import check_compatibility, dev_weights
from fusionlab.errors import FusionlabError
from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker
from fusionlab.models import cache_dir, load_model
from fusionlab.tasks import task_inputs

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    ens: EnsembleConfig = OmegaConf.to_object(cfg.ensemble)
    specs = [OmegaConf.to_object(cfg.model)] + [dataclasses.replace(s, name=n) for n, s in ens.aux.items()]
    if len({s.name for s in specs}) != len(specs):  # the main model may also be an aux model under its own name
        specs = [dataclasses.replace(s, name=f"{s.name}_{i}") for i, s in enumerate(specs)]
    align_method = OmegaConf.to_object(cfg.align_method) if cfg.get("align_method") is not None else "vecmap_csls"
    inputs = task_inputs(OmegaConf.to_object(cfg.task))
    task, examples, shots = inputs.task, inputs.examples, inputs.shots
    if ens.weights_from and len(inputs.dev) < ens.dev_examples:
        raise FusionlabError(f"ensemble.weights_from={ens.weights_from!r} scores the members on "
                             f"{ens.dev_examples} dev examples but task.split={cfg.task.split!r} leaves "
                             f"{len(inputs.dev)}: use task.split=test (with task.dev_size > task.n_shot + "
                             "ensemble.dev_examples) so the scored examples are never reported ones.")
    max_new_tokens = OmegaConf.to_object(cfg.generation).new_tokens_for(task.max_new_tokens)

    with make_tracker(cfg, output_dir) as tracker:
        loaded = [load_model(s) for s in specs]
        alignments = align_members(loaded[0], loaded[1:], align_method, {"progress": True},
                                   Path(ens.cache_dir) if ens.cache_dir else cache_dir() / "align", ens.rebuild_alignment)
        members = [Member(s.name, m, t, s.use_chat_template) for s, (m, t) in zip(specs, loaded)]
        before, _ = check_compatibility(members, alignments, task.name, inputs.dev[:ens.warmup], ens, max_new_tokens,
                                        batch_size=ens.batch_size)
        options = ens.decoding()
        if ens.weights_from == "dev_score":
            weights, scores = dev_weights(members, task.name, inputs.dev[:ens.dev_examples], ens, max_new_tokens,
                                          shots=shots, batch_size=ens.batch_size)
            options, before = dataclasses.replace(options, weights=weights), {**before, **scores}
        step = iter(range(10**9))  # one increasing step across members and ensemble (W&B drops steps that go back)
        report = evaluate_ensemble(
            members, alignments, task.name, examples, options, max_new_tokens, shots=shots,
            batch_size=ens.batch_size, eval_members=ens.eval_members, bootstrap_samples=ens.bootstrap_samples,
            seed=cfg.get("seed") or 0,
            on_batch=lambda tag, out: tracker.log({f"{tag}_batch_tokens_per_s": out.tokens_per_s,
                                                   **{f"{tag}_{k}": v for k, v in out.stats.items()}}, step=next(step)))
        report.metrics.update(before)
        write_jsonl(output_dir / "predictions.jsonl", report.rows)
        tracker.log(report.metrics)
        tracker.log_table("predictions", report.rows)
        tracker.summary(report.metrics)
    log.info("ensemble on %s (n=%d):\n%s", task.name, len(examples), report.table())
    return report.metrics
