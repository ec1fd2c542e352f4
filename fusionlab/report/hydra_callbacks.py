"""Hydra callbacks for sweeps (named by ``_target_`` in ``conf/hparams_search/*.yaml``).

Hydra calls every ``on_*`` hook by name, so these are plain classes with no-op hooks:
no Hydra import is needed here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class _NoOp:
    def on_run_start(self, config: Any, **kwargs: Any) -> None: ...
    def on_run_end(self, config: Any, **kwargs: Any) -> None: ...
    def on_multirun_start(self, config: Any, **kwargs: Any) -> None: ...
    def on_multirun_end(self, config: Any, **kwargs: Any) -> None: ...
    def on_job_start(self, config: Any, **kwargs: Any) -> None: ...
    def on_job_end(self, config: Any, job_return: Any = None, **kwargs: Any) -> None: ...


class MakeSweepDir(_NoOp):
    """Create the sweep dir before the sweeper starts: the Optuna sweeper opens its SQLite study
    (``sqlite:///<sweep dir>/optuna.db``) before any job has created the dir, and SQLite cannot."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
