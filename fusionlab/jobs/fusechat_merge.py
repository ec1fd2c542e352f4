"""Job ``fusechat_merge``: FuseChat's last stage — SCE-merge the pairwise fusion targets against the pivot.

FuseChat distils the pivot once per source (pivot ⊕ source_j → target_j, same architecture as the
pivot) and then merges the targets in weight space with SCE, base = the pivot. This job does it in
one command:

1. targets: ``fusechat_merge.targets`` (HF dirs of distilled pivots, e.g. ``<distill run>/model``), or
   else one distillation (:mod:`fusionlab.distill.pipeline`) per ``fusechat_merge.pairwise`` entry
   (``{name: {rows: [start, stop], distill: {setting: value}}}``: the rows of ``distill.data.path`` to
   train on and the distill settings of that target, e.g. ``pairwise_source``), each in
   ``<output_dir>/pairwise/<name>`` (a finished target is reused on a rerun);
2. the merge: ``merge.method`` (sce by default, ``merge_method=<name>``) with ``base`` = the pivot
   checkpoint, written to ``<output_dir>/merged`` (fp32 by default: a few distillation steps move the
   weights by less than a bf16 ulp);
3. FuseChat's table: the pivot, every target and the merge scored on the distill run's held-out
   conversations (assistant-token CE and perplexity with 95% intervals, paired ``merged − pivot``,
   ``merged − <target>`` and ``<target> − pivot`` differences, and the task of ``distill.eval``)
   → ``heldout/…`` (:func:`fusionlab.distill.pipeline.score_checkpoints`); and, when
   ``fusechat_merge.eval`` is set, plain-text perplexity as the merge job's ``eval`` → ``ppl/…``.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import lightning_trainer, make_tracker, trainer_factory

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from hydra.utils import instantiate

    from fusionlab.distill.pipeline import finished_target, pairwise_targets, pivot_checkpoint, score_checkpoints
    from fusionlab.merge import InputModel, MergeConfig, merge, plan

    if cfg.get("merge") is None:
        raise FusionlabError("job=fusechat_merge needs merge: (method, parameters); start from +experiment=fusechat_merge.")
    fm = OmegaConf.to_object(cfg.fusechat_merge)
    from fusionlab.distill.strategy import check_strategy_devices

    check_strategy_devices(OmegaConf.select(cfg, "trainer.strategy._target_"),  # before any model loads
                           OmegaConf.select(cfg, "trainer.accelerator"))
    dc = OmegaConf.to_object(cfg.distill)
    targets = fm.named_targets()
    metrics: dict[str, Any] = {}
    if not targets:
        fit_kwargs = {"optimizer": instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                      "scheduler": instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                      "seed": int(cfg.seed or 0)}
        # the first target to fit gets its trainer (and loggers: W&B refuses) before any target is prepared
        first = next((output_dir / "pairwise" / n for n in fm.pairwise
                      if not finished_target(output_dir / "pairwise" / n)), None)
        make_trainer = trainer_factory(cfg, first) if first else lambda out: lightning_trainer(cfg, out)
        targets, metrics = pairwise_targets(dc, fm.pairwise, output_dir / "pairwise", make_trainer, **fit_kwargs)
    if len(targets) < 2:
        log.warning("Only %d fusion target(s): SCE of one target against the pivot is that target.", len(targets))

    pivot = pivot_checkpoint(OmegaConf.to_object(cfg.model), output_dir / "pivot")
    mc: MergeConfig = OmegaConf.to_object(cfg.merge)
    mc = dataclasses.replace(mc, base=str(pivot), models=[InputModel(d) for d in targets.values()],
                             output=mc.output or str(output_dir / "merged"),
                             tokenizer_source=mc.tokenizer_source or str(pivot))
    planned = plan(mc)  # config errors before a tracker or any output exists
    with make_tracker(cfg, output_dir) as tr:
        metrics.update({"merge_method": mc.method, "fusion_targets": len(targets), **merge(mc, planned)})
        models = {"pivot": str(pivot), **targets, "merged": mc.output}
        diffs = [("merged", "pivot"), *[("merged", t) for t in targets], *[(t, "pivot") for t in targets]]
        metrics.update(score_checkpoints(dc, models, int(cfg.seed or 0), diffs))
        ppl = fm.eval.score(models) if fm.eval else {}
        metrics.update(ppl)
        if ppl:
            metrics["ppl_mean/merged_over_pivot"] = round(ppl["ppl_mean/merged"] / ppl["ppl_mean/pivot"], 4)
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tr.summary(metrics)
    from fusionlab.report.tables import comparison_markdown

    if table := comparison_markdown(metrics, models, ("merged", "pivot")):  # FuseChat's table
        log.info("held-out comparison (value [95%% interval]; merged − pivot paired):\n%s", table)
    return metrics
