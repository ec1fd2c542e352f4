"""Command-line entry: ``python -m fusionlab.run +experiment=NAME [overrides]``.

A thin ``@hydra.main`` that hands the composed config to :func:`run`, a plain function
that tests call directly. ``cfg.job`` names a module in :mod:`fusionlab.jobs` whose
``run(cfg, output_dir) -> dict`` does the work; the returned flat dict is written to
``<output_dir>/metrics.json``, the file every sweep and report reads.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from fusionlab.errors import FusionlabError
from fusionlab.io import write_json

log = logging.getLogger("fusionlab")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# conf/hydra/launcher/*.yaml share their names with the launcher plugins' schemas on purpose (so a
# mistyped launcher option fails); Hydra warns about that matching on every run.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


def _job_module(name: str):
    try:
        return importlib.import_module(f"fusionlab.jobs.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"fusionlab.jobs.{name}":
            raise
        jobs_dir = Path(__file__).parent / "jobs"
        known = sorted(p.stem for p in jobs_dir.glob("*.py") if not p.stem.startswith("_"))
        raise FusionlabError(f"Unknown job {name!r}; set job= to one of {known}.") from e


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job that ``cfg.job`` names and write its ``metrics.json``; return the metrics."""
    import lightning

    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("seed") is not None:
        lightning.seed_everything(int(cfg.seed), workers=True, verbose=False)
    job = _job_module(cfg.job)
    start = time.perf_counter()
    metrics = job.run(cfg, output_dir)
    metrics = {"job": cfg.job, **metrics, "wall_s": round(time.perf_counter() - start, 3), "status": "ok"}
    if _is_global_rank_zero():  # multi-GPU jobs run this function once per rank
        write_json(output_dir / "metrics.json", metrics)
        log.info("Wrote %s", output_dir / "metrics.json")
    return metrics


def _is_global_rank_zero() -> bool:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Leave a readable trace of a failed job in its output dir (sweeps report it as failed)."""
    if not _is_global_rank_zero():
        return
    try:
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "metrics.json",
                   {"job": cfg.get("job"), "status": "failed", "error": f"{type(err).__name__}: {err}"})
    except Exception:  # the original error matters more than this record
        pass


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except FusionlabError as err:
        _record_failure(cfg, err)
        print(f"fusionlab: error: {err}", file=sys.stderr)
        if _in_multirun():
            raise  # hydra records the job as failed; the sweep goes on
        sys.exit(2)
    except BaseException as err:
        _record_failure(cfg, err)
        raise
    objective = cfg.get("objective")
    value = metrics.get(objective) if objective else None
    return float(value) if isinstance(value, (int, float)) else None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
