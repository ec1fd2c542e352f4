"""Find the runs below sweep / run dirs and flatten each into one table row.

A run is a dir holding ``metrics.json`` (written by ``fusionlab.run`` on success *and* on
failure) or a Hydra job dir (``.hydra/overrides.yaml``) without one: a job that was killed
or is still running. Reading never imports Hydra: the ``.hydra/*.yaml`` files are plain YAML.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fusionlab.errors import FusionlabError
from fusionlab.io import read_yaml
from fusionlab.tracking import is_multirun

SKIP_DIRS = {"wandb", "csv", "lightning_logs", "checkpoints", "__pycache__"}


@dataclass
class Run:
    """One job's results: where it ran, the overrides that made it, and its metrics."""

    path: Path
    name: str                     # path relative to the dir the user gave (``0``, ``sweep/3``)
    status: str                   # ok | failed | interrupted | incomplete
    overrides: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None  # the config's ``objective`` (the metric sweepers optimise)
    sweep_dir: Path | None = None  # the multirun dir (holds ``multirun.yaml``), if any

    def row(self) -> dict[str, Any]:
        """Flat row: run, status, job, the overrides, then the metrics (``error`` last)."""
        metrics = {k: v for k, v in self.metrics.items() if k not in ("job", "status", "error")}
        row: dict[str, Any] = {"run": self.name, "status": self.status, "job": self.metrics.get("job")}
        row.update(self.overrides)
        for k, v in metrics.items():
            row.setdefault(k, v)
        if "error" in self.metrics:
            row["error"] = self.metrics["error"]
        return row


def _natural_key(path: Path) -> list:
    """Sort ``sweep/2`` before ``sweep/10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _walk(root: Path) -> list[Path]:
    """Run dirs below ``root`` (inclusive), skipping logger/checkpoint/hidden dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith(".")]
        d = Path(dirpath)
        if "metrics.json" in filenames or (d / ".hydra" / "overrides.yaml").is_file():
            found.append(d)
    return found


def parse_override(text: str) -> tuple[str, Any]:
    """``+ensemble.topk=10`` -> ("ensemble.topk", 10); values are parsed as YAML scalars."""
    key, _, value = text.partition("=")
    key = key.lstrip("+~")
    if key.startswith("experiment") or "@" in key:  # group choices stay strings
        return key, value
    try:
        parsed = yaml.safe_load(value) if value != "" else None
    except yaml.YAMLError:
        parsed = value
    if not isinstance(parsed, (int, float, str, bool)):
        parsed = value  # null, lists, dicts stay as written: "null" is not "not overridden"
    return key, parsed


def _read_yaml(path: Path) -> Any:
    """A ``.hydra`` file's content; None when it is missing, not YAML or not text (a damaged run dir must not
    stop the report: its row says what is missing instead)."""
    if not path.is_file():
        return None
    try:
        return read_yaml(path)
    except FusionlabError:
        return None


def read_overrides(run_dir: Path) -> dict[str, Any]:
    items = _read_yaml(run_dir / ".hydra" / "overrides.yaml")
    return dict(parse_override(str(item)) for item in items) if isinstance(items, list) else {}


def read_objective(run_dir: Path) -> str | None:
    cfg = _read_yaml(run_dir / ".hydra" / "config.yaml")
    objective = cfg.get("objective") if isinstance(cfg, dict) else None
    return str(objective) if objective else None


def _sweep_dir(run_dir: Path) -> Path | None:
    """The multirun dir a job ran in: ``.hydra/hydra.yaml`` says MULTIRUN, and Hydra puts the job in a
    subdir of the sweep dir (the Optuna sweeper writes no ``multirun.yaml``, so don't look for one)."""
    saved = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    hydra = saved.get("hydra") if isinstance(saved, dict) else None
    if isinstance(hydra, dict) and is_multirun(hydra):
        return run_dir.parent
    return run_dir.parent if (run_dir.parent / "multirun.yaml").is_file() else None


def read_run(run_dir: Path, root: Path) -> Run:
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            metrics = {"status": "failed", "error": f"unreadable metrics.json: {e}"}
        if not isinstance(metrics, dict):
            metrics = {"status": "failed", "error": f"metrics.json holds a {type(metrics).__name__}, not an object"}
        status = str(metrics.get("status", "ok"))
    else:
        metrics, status = {"error": "no metrics.json (killed, or still running)"}, "incomplete"
    # "<sweep dir name>/3": unique when several sweeps are merged into one table
    name = root.name if run_dir == root else f"{root.name}/{run_dir.relative_to(root).as_posix()}"
    return Run(path=run_dir, name=name, status=status, overrides=read_overrides(run_dir),
               metrics=metrics, objective=read_objective(run_dir), sweep_dir=_sweep_dir(run_dir))


def collect_runs(dirs: list[str | os.PathLike], exclude: list[str | os.PathLike] = ()) -> list[Run]:
    """Every run below ``dirs`` (each a run dir, a multirun dir or any parent of them)."""
    if not dirs:
        raise FusionlabError("No directories given: pass run or sweep dirs, e.g. "
                             "python -m fusionlab.report logs/ensemble/multiruns/<date>.")
    excluded = {Path(p).resolve() for p in exclude}
    runs: list[Run] = []
    seen: set[Path] = set()
    for d in dirs:
        root = Path(d).resolve()
        if not root.is_dir():
            raise FusionlabError(f"{str(d)!r} is not a directory; pass a run dir or a multirun sweep dir "
                                 f"(e.g. logs/<job>/multiruns/<date>).")
        found = [p for p in _walk(root) if p not in seen
                 and not any(p == e or e in p.parents for e in excluded)]
        if not found:
            raise FusionlabError(f"No runs below {str(d)!r}: no metrics.json or .hydra/overrides.yaml was found. "
                                 "Pass the output dir of `python -m fusionlab.run` (logs/<job>/runs/<date>) or of a "
                                 "multirun (logs/<job>/multiruns/<date>).")
        for p in sorted(found, key=_natural_key):
            seen.add(p)
            runs.append(read_run(p, root))
    return runs


def sweep_objective(runs: list[Run]) -> str | None:
    """The objective most runs were configured with (a sweep shares one)."""
    names = [r.objective for r in runs if r.objective]
    return max(set(names), key=names.count) if names else None


def varying_overrides(runs: list[Run]) -> list[str]:
    """Override keys whose value differs between runs: what a sweep swept."""
    keys: list[str] = []
    for r in runs:
        keys += [k for k in r.overrides if k not in keys]
    return [k for k in keys if len({repr(r.overrides.get(k)) for r in runs}) > 1]


def read_optuna_results(runs: list[Run]) -> dict[Path, dict]:
    """``optimization_results.yaml`` that the Optuna sweeper leaves in each sweep dir."""
    out = {}
    for sweep in {r.sweep_dir for r in runs if r.sweep_dir is not None}:
        path = sweep / "optimization_results.yaml"
        if path.is_file():
            out[sweep] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return out
