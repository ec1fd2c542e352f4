"""Report plots: a heatmap over two swept hyperparameters, and metric-versus-step curves."""
from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from fusionlab.io import atomic_path

# (x, y) override pairs that get a heatmap when a sweep varies both
HEATMAP_PAIRS = [("ensemble.topk", "ensemble.drop"), ("distill.lam", "distill.temperature")]
# columns of step logs that are bookkeeping, not metrics
_NOT_METRICS = {"step", "epoch", "_step", "_runtime", "_timestamp", "global_step"}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _sort_values(values: list[Any]) -> list[Any]:
    nums = [v for v in values if _number(v) is not None]
    rest = sorted((v for v in values if _number(v) is None), key=str)
    return sorted(nums, key=float) + rest


def _savefig(fig, path: str | os.PathLike) -> Path:
    """Save atomically: a half-written PNG never replaces a good one."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def heatmap_grid(rows: list[dict[str, Any]], x: str, y: str, metric: str):
    """Mean ``metric`` per (x, y) cell, with how many runs landed there and how many failed.

    Returns ``(xs, ys, values, counts, failed)`` where ``values[i][j]`` belongs to ``ys[i]``, ``xs[j]``
    (``None`` where no run succeeded).
    """
    xs = _sort_values(list({r.get(x) for r in rows if r.get(x) is not None}))
    ys = _sort_values(list({r.get(y) for r in rows if r.get(y) is not None}))
    sums = [[0.0] * len(xs) for _ in ys]
    counts = [[0] * len(xs) for _ in ys]
    failed = [[0] * len(xs) for _ in ys]
    for r in rows:
        if r.get(x) not in xs or r.get(y) not in ys:
            continue
        i, j = ys.index(r.get(y)), xs.index(r.get(x))
        v = _number(r.get(metric))
        if r.get("status") != "ok" or v is None:
            failed[i][j] += 1
            continue
        sums[i][j] += v
        counts[i][j] += 1
    values = [[sums[i][j] / counts[i][j] if counts[i][j] else None for j in range(len(xs))] for i in range(len(ys))]
    return xs, ys, values, counts, failed


def plot_heatmap(rows: list[dict[str, Any]], x: str, y: str, metric: str, path: str | os.PathLike,
                 title: str | None = None) -> Path:
    """``metric`` over the ``x`` × ``y`` grid (cells: mean over runs; ``failed`` where none succeeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    xs, ys, values, counts, failed = heatmap_grid(rows, x, y, metric)
    grid = np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(xs), 2), 1.0 + 0.8 * max(len(ys), 2)))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, label=metric)
    ax.set_xticks(range(len(xs)), [str(v) for v in xs])
    ax.set_yticks(range(len(ys)), [str(v) for v in ys])
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(ys)):
        for j in range(len(xs)):
            if values[i][j] is None:
                text, color = ("failed" if failed[i][j] else "—"), "red" if failed[i][j] else "gray"
            else:
                text = f"{values[i][j]:.3g}" + (f"\n(n={counts[i][j]})" if counts[i][j] > 1 else "")
                color = "black" if values[i][j] >= mid and finite.size and finite.max() > finite.min() else "white"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=9)
    ax.set_title(title or f"{metric} over {x} × {y}")
    return _savefig(fig, path)


def read_step_logs(run_dir: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """Metric -> [(step, value)] from a run's ``log.csv`` (Tracker) and Lightning ``metrics.csv`` files."""
    run_dir = Path(run_dir)
    files = [run_dir / "log.csv"] + sorted(p for p in run_dir.rglob("metrics.csv") if "wandb" not in p.parts)
    series: dict[str, list[tuple[float, float]]] = {}
    for path in files:
        if not path.is_file():
            continue
        with open(path, newline="", encoding="utf-8") as f:
            for i, row in enumerate(csv.DictReader(f)):
                step = _number(row.get("step"))
                step = float(i) if step is None else step
                for key, text in row.items():
                    v = _number(text) if key not in _NOT_METRICS else None
                    if key and v is not None:
                        series.setdefault(key, []).append((step, v))
    return {k: sorted(v) for k, v in series.items() if len(v) >= 2}


def _priority(metric: str) -> tuple:
    m = metric.lower()
    rank = 0 if "loss" in m else 1 if ("acc" in m or "eval" in m) else 3 if m.startswith(("lr", "time")) else 2
    return (rank, m)


def plot_curves(runs: dict[str, dict[str, list[tuple[float, float]]]], path: str | os.PathLike,
                max_metrics: int = 6) -> Path | None:
    """One panel per metric (losses first), one line per run; None if no run logged ≥ 2 steps."""
    metrics = sorted({m for s in runs.values() for m in s}, key=_priority)[:max_metrics]
    if not metrics:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(metrics), 3)
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for label, series in runs.items():
            if metric in series:
                steps, values = zip(*series[metric])
                ax.plot(steps, values, label=label, marker="." if len(steps) < 30 else None)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8,
                   bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 4)))
    fig.tight_layout()
    return _savefig(fig, path)
