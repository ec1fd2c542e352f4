"""Gather the runs of sweeps into one table and a few plots.

``python -m fusionlab.report <sweep or run dirs...> [--out DIR] [--metric NAME] [--wandb]``
reads every ``metrics.json`` below the dirs (failed and unfinished jobs included) and writes
``report.md``, ``report.csv``, a heatmap per swept hyperparameter pair (EVA: topk × drop) and
metric-versus-step curves for training runs. Plain library code: no Hydra needed to read results.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_write_text, write_json
from fusionlab.report.collect import (Run, collect_runs, read_optuna_results, sweep_objective,
                                      varying_overrides)
from fusionlab.report.plots import HEATMAP_PAIRS, plot_curves, plot_heatmap, read_step_logs
from fusionlab.report.tables import columns_of, heldout_rows, read_report_csv, to_markdown, write_csv
from fusionlab.tracking import sweep_group_name

__all__ = ["Report", "build_report", "collect_runs", "read_report_csv", "plot_heatmap", "plot_curves",
           "read_step_logs", "push_to_wandb"]

log = logging.getLogger(__name__)


@dataclass
class Report:
    out_dir: Path
    runs: list[Run]
    rows: list[dict[str, Any]]
    columns: list[str]
    metric: str | None
    files: dict[str, Path] = field(default_factory=dict)  # report.md, report.csv, heatmap_*.png, curves.png


def _pick_metric(rows: list[dict[str, Any]], runs: list[Run], metric: str | None) -> str | None:
    if metric:
        if not any(metric in r for r in rows):
            known = sorted({k for r in runs for k in r.metrics})
            raise FusionlabError(f"--metric {metric!r} is in no run's metrics.json; use one of {known}.")
        return metric
    for name in (sweep_objective(runs), "accuracy", "ensemble_accuracy"):
        if name and any(r.get(name) is not None for r in rows):
            return name
    return None


def _heatmap_pairs(rows: list[dict[str, Any]], pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(x, y) for x, y in pairs if any(r.get(x) is not None and r.get(y) is not None for r in rows)]


def _run_label(run: Run, keys: list[str]) -> str:
    parts = [f"{k.split('.')[-1]}={run.overrides[k]}" for k in keys if k in run.overrides]
    return ", ".join(parts) or run.name


def build_report(dirs: list[str | os.PathLike], out_dir: str | os.PathLike | None = None, *,
                 metric: str | None = None, heatmaps: list[tuple[str, str]] | None = None) -> Report:
    """Collect the runs below ``dirs`` and write the table and plots to ``out_dir``.

    ``out_dir`` defaults to ``<dir>/report`` for one input dir and ``./report`` for several.
    ``metric`` (default: the sweep's ``objective``, else ``accuracy``) colours the heatmaps.
    """
    if out_dir is None:
        out_dir = Path(dirs[0]) / "report" if len(dirs) == 1 else Path("report")
    out_dir = Path(out_dir)
    runs = collect_runs(list(dirs), exclude=[out_dir])
    rows = [r.row() for r in runs]
    columns = columns_of(rows)
    metric = _pick_metric(rows, runs, metric)
    overrides = list(dict.fromkeys(k for r in runs for k in r.overrides))
    if metric in columns:  # the metric right after the overrides, where a reader looks first
        columns.remove(metric)
        columns.insert(max([columns.index(k) for k in overrides if k in columns], default=2) + 1, metric)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FusionlabError(f"the report's output dir {str(out_dir)!r} cannot be created ({err.strerror}); pass "
                             "--out with a directory you can write to.") from None
    report = Report(out_dir=out_dir, runs=runs, rows=rows, columns=columns, metric=metric)

    swept = varying_overrides(runs)
    pairs = heatmaps if heatmaps is not None else _heatmap_pairs(rows, HEATMAP_PAIRS)
    for x, y in pairs:
        if metric is None:
            log.warning("No metric to plot for the %s × %s heatmap; pass --metric.", x, y)
            break
        if not any(x in r and y in r for r in rows):
            raise FusionlabError(f"Heatmap axes {x!r} × {y!r}: no run overrides both; swept keys are {swept}.")
        name = f"heatmap_{x.split('.')[-1]}_{y.split('.')[-1]}.png"
        report.files[name] = plot_heatmap(rows, x, y, metric, out_dir / name)

    curves = {_run_label(r, swept): s for r in runs if (s := read_step_logs(r.path))}
    if curves and (path := plot_curves(curves, out_dir / "curves.png")) is not None:
        report.files["curves.png"] = path

    report.files["report.csv"] = write_csv(out_dir / "report.csv", rows, columns)
    report.files["report.md"] = atomic_write_text(out_dir / "report.md",
                                                  _markdown(runs, rows, columns, metric, swept, report.files))
    write_json(out_dir / "report.json", {"metric": metric, "swept": swept, "overrides": overrides, "rows": rows,
                                         "files": {k: str(v) for k, v in report.files.items()}})
    return report


def _markdown(runs: list[Run], rows, columns, metric, swept, files) -> str:
    n_ok = sum(r.status == "ok" for r in runs)
    bad = [r for r in runs if r.status != "ok"]
    lines = ["# fusionlab report", "",
             f"{len(runs)} runs: {n_ok} ok" + "".join(f", {sum(r.status == s for r in bad)} {s}"
                                                      for s in sorted({r.status for r in bad})) + ".",
             ""]
    if metric:
        lines.append(f"Metric: `{metric}`." + (f" Swept: {', '.join(f'`{k}`' for k in swept)}." if swept else ""))
        scored = [r for r in rows if r.get("status") == "ok" and isinstance(r.get(metric), (int, float))]
        if scored:
            best = max(scored, key=lambda r: r[metric])
            params = ", ".join(f"{k}={best.get(k)}" for k in swept) or best["run"]
            lines.append(f"Highest `{metric}`: {best[metric]:.4g} ({params}).")
        lines.append("")
    for sweep, res in read_optuna_results(runs).items():
        lines += [f"Optuna ({sweep.name}): best value {res.get('best_value')} with {res.get('best_params')}.", ""]
    lines.append(to_markdown(rows, columns))
    if held := heldout_rows(runs):  # distill runs: is fusion better than the pivot and than plain CLM training?
        lines += ["## Held-out: pivot / CLM baseline / fused", "",
                  "Mean over held-out conversations [95% bootstrap interval]; fused − clm is paired (same "
                  "conversations or examples).", "", to_markdown(held)]
    for name in files:
        if name.endswith(".png"):
            lines += [f"![{name}]({name})", ""]
    if bad:
        lines += ["## Failed or unfinished runs", ""]
        lines += [f"- `{r.name}` ({r.status}): {r.metrics.get('error', '')}" for r in bad]
        lines.append("")
    return "\n".join(lines)


def push_to_wandb(report: Report, *, project: str = "fusionlab", mode: str | None = None,
                  group: str | None = None, name: str | None = None) -> str | None:
    """Log the table and the plots as one W&B run (offline unless a key is set); return its id."""
    from fusionlab.tracking import Tracker

    with Tracker(report.out_dir, {"metric": report.metric, "runs": len(report.rows)}, use_wandb=True,
                 project=project, mode=mode, group=group, name=name or "report", job_type="report") as tracker:
        tracker.log_table("report", [{c: r.get(c) for c in report.columns} for r in report.rows])
        for key, path in report.files.items():
            if key.endswith(".png"):
                tracker.log_image(key.removesuffix(".png"), path)
        return tracker.run.id if tracker.run is not None else None


def sweep_group(report: Report) -> str | None:
    """The W&B group of the jobs when the report covers one sweep of one job (``<job>-<sweep dir>``)."""
    jobs = {r.metrics.get("job") for r in report.runs}
    sweeps = {r.sweep_dir for r in report.runs}
    if len(jobs) == 1 and len(sweeps) == 1 and None not in sweeps and None not in jobs:
        return sweep_group_name(jobs.pop(), sweeps.pop())
    return None
