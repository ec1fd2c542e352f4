"""Job ``distill``: FuseChat / FuseLLM knowledge fusion of ``distill.sources`` into the pivot (``model``).

The library pipeline (:mod:`fusionlab.distill.pipeline`) does the work: representations (cached,
resumable) → token/vocab/distribution alignment (cached) → Lightning fit of the pivot → the
trained pivot as an HF directory. This job builds the Lightning pieces from the config (trainer
strategy from ``conf/trainer``, callbacks, loggers, optimizer and scheduler factories).

Under ddp/fsdp/deepspeed Lightning re-launches this command for the other ranks; they find
every cache complete and only read it.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.jobs._common import check_resume, trainer_factory

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from hydra.utils import instantiate

    from fusionlab.distill.pipeline import distill

    dc = OmegaConf.to_object(cfg.distill)
    from fusionlab.distill.strategy import check_strategy_devices

    check_strategy_devices(OmegaConf.select(cfg, "trainer.strategy._target_"),  # before any model loads
                           OmegaConf.select(cfg, "trainer.accelerator"))
    check_resume(cfg, output_dir, dc.resume_checkpoint(output_dir))  # never continue another config's weights
    fit_kwargs = dict(optimizer=instantiate(cfg.optimizer) if cfg.get("optimizer") else None,
                      scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
                      seed=int(cfg.seed or 0))
    if dc.mode == "implicit":  # FuseChat-3.0: sample, score, SFT, DPO/WRPO (fusionlab.distill.implicit)
        from fusionlab.distill.implicit import implicit_fusion

        metrics = implicit_fusion(dc, trainer_factory(cfg, output_dir / "sft"), output_dir, **fit_kwargs)
        baseline = "sft"
    else:
        metrics = distill(dc, trainer_factory(cfg, output_dir), output_dir, **fit_kwargs)
        baseline = "clm"
    from fusionlab.report.tables import comparison_markdown

    if table := comparison_markdown(metrics, ("pivot", baseline, "fused"), ("fused", baseline)):  # read first
        log.info("held-out comparison (value [95%% interval]; fused − %s paired):\n%s", baseline, table)
    return metrics
