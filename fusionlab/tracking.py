"""Experiment tracking for jobs: W&B (offline unless asked) and a flat CSV, closed cleanly.

Every job gets one ``Tracker``; it owns one W&B run, so jobs of a sweep never merge into one
run (``mode`` is passed per run, never through the process-wide WANDB_MODE). A job passes the
run id stored in its output dir (``resume="allow"``), so a re-run or resumed job continues its run.
"""
from __future__ import annotations

import contextlib
import csv
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)


def is_multirun(hydra: Any) -> bool:
    """Whether a Hydra node — the live ``HydraConfig`` or a run's saved ``.hydra/hydra.yaml`` — is a multirun job's."""
    return bool(hydra) and str(hydra.get("mode")) in ("MULTIRUN", "RunMode.MULTIRUN")


def sweep_group_name(job: str, sweep_dir: str | os.PathLike) -> str:
    """The W&B group of one job's sweep; jobs and ``fusionlab.report`` must agree on it."""
    return f"{job}-{Path(sweep_dir).name}"


def wandb_mode(mode: str | None) -> str:
    """``null`` means offline unless the user has an API key; never touches WANDB_MODE globally."""
    if mode is None:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    if mode not in ("online", "offline", "disabled"):
        raise FusionlabError(f"logger.wandb.mode={mode!r}; use online, offline or disabled.")
    return mode


def wandb_start_error(err: BaseException, mode: str) -> FusionlabError | None:
    """W&B's own failure to start a run (no network, no API key, a bad WANDB_MODE) as one fusionlab error, else None."""
    import wandb

    env_mode = os.environ.get("WANDB_MODE")
    if type(err).__name__ == "ValidationError" and env_mode is not None and "mode" in str(err):  # wandb's pydantic
        return FusionlabError(f"the environment variable WANDB_MODE={env_mode!r} is not a W&B mode; unset it or set "
                              "it to online, offline or disabled (fusionlab sets each run's mode: logger.wandb.mode).")
    if isinstance(err, wandb.errors.Error):
        reason = " ".join(str(err).split())[:300].rstrip(".")
        return FusionlabError(f"W&B could not start the run (mode={mode}): {reason}. Without network or an API key "
                              "run offline — logger.wandb.mode=offline for a job (or logger=csv / logger=none), "
                              "--wandb-mode offline for the report — and sync later with `wandb sync <dir>/wandb`.")
    return None


@contextlib.contextmanager
def starting_wandb(mode: str) -> Iterator[None]:
    """Run ``wandb.init`` (or what calls it) with W&B's start-up failures turned into :func:`wandb_start_error`."""
    try:
        yield
    except Exception as err:
        failure = wandb_start_error(err, mode)
        if failure is None:
            raise
        raise failure from None


class Tracker:
    """Log scalars, tables and images of one job to W&B and ``<output_dir>/log.csv``."""

    def __init__(self, output_dir: str | os.PathLike, config: dict[str, Any] | None = None, *,
                 use_wandb: bool = True, project: str = "fusionlab", mode: str | None = None,
                 group: str | None = None, name: str | None = None, tags: Iterable[str] = (),
                 job_type: str | None = None, id: str | None = None, resume: str | None = None):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.output_dir / "log.csv"
        self._csv_rows: list[dict[str, Any]] = []
        self.run = None
        if use_wandb:
            import wandb

            mode = wandb_mode(mode)
            with starting_wandb(mode):
                self.run = wandb.init(project=project, dir=str(self.output_dir), mode=mode, group=group, name=name,
                                      tags=list(tags), job_type=job_type, config=config or {}, id=id, resume=resume,
                                      reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
        self._csv_rows.append({"step": step, **scalars})
        if self.run is not None:
            self.run.log(metrics, step=step)

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        data = [[r.get(c) if isinstance(r.get(c), (int, float, str, bool)) or r.get(c) is None else str(r.get(c))
                 for c in columns] for r in rows]
        self.run.log({key: wandb.Table(columns=columns, data=data)})

    def log_image(self, key: str, path: str | os.PathLike) -> None:
        if self.run is None:
            return
        import wandb

        self.run.log({key: wandb.Image(str(path))})

    def summary(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in metrics.items():
                self.run.summary[k] = v

    def finish(self, exit_code: int = 0) -> None:
        if self._csv_rows:
            fields: list[str] = []
            for row in self._csv_rows:
                fields += [k for k in row if k not in fields]
            with open(self.csv_path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(self._csv_rows)
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)
