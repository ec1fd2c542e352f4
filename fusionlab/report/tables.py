"""The report table as CSV (every value, for notebooks and spreadsheets) and Markdown (for reading)."""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable

from fusionlab.io import atomic_write_text


def columns_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Union of the rows' keys in first-seen order, ``error`` last; all-empty columns dropped."""
    rows = list(rows)
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    cols = [c for c in cols if any(r.get(c) not in (None, "") for r in rows)]
    if "error" in cols:
        cols = [c for c in cols if c != "error"] + ["error"]
    return cols


def to_csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or columns_of(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    return buf.getvalue()


def _cell(value: Any, width: int = 60) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.4g}"
    else:
        text = str(value)
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[:width - 1] + "…"


def to_markdown(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    columns = columns or columns_of(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_csv(path: str | os.PathLike, rows: list[dict[str, Any]], columns: list[str] | None = None) -> Path:
    return atomic_write_text(path, to_csv(rows, columns))


def _parse(text: str) -> Any:
    if text == "":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(text, text)


def read_report_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``report.csv`` with numbers parsed back (empty cells are None)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


COMPARED = ("pivot", "clm", "fused")  # the distill runs' held-out table: start, baseline, method


def _with_interval(metrics: dict[str, Any], key: str) -> str | None:
    value = metrics.get(key)
    if not isinstance(value, (int, float)):
        return None
    low, high = metrics.get(f"{key}_low"), metrics.get(f"{key}_high")
    return f"{value:.4f} [{low:.4f}, {high:.4f}]" if isinstance(low, (int, float)) and isinstance(high, (int, float)) \
        else f"{value:.4f}"


def heldout_comparison(metrics: dict[str, Any], run: str | None = None, models: Iterable[str] = COMPARED,
                       difference: tuple[str, str] = ("fused", "clm")) -> list[dict[str, Any]]:
    """One run's held-out (or dev) scores: ``models`` side by side (value [95% interval]; by default pivot /
    CLM baseline / fused) and the paired ``difference`` (a − b), for CE and for the task metric if any."""
    models, (a, b) = list(models), difference
    rows = []
    for split in ("heldout", "dev"):
        if not any(k.startswith(f"{split}/ce/") for k in metrics):
            continue
        metric_names = sorted({k.split("/")[1] for k in metrics if k.startswith(f"{split}/")
                               and k.count("/") == 2 and k.split("/")[2] in models} - {"ppl"})
        for metric in metric_names:
            task = metrics.get(f"{split}/task") if metric != "ce" else None
            row = {"run": run, "split": split, "metric": f"{task} {metric}" if task else metric,
                   "n": metrics.get(f"{split}/conversations") if metric == "ce" else metrics.get(f"{split}/{metric}_examples")}
            for model in models:
                row[model] = _with_interval(metrics, f"{split}/{metric}/{model}")
            row[f"{a} − {b}"] = _with_interval(metrics, f"{split}/{metric}_diff/{a}_minus_{b}")
            rows.append(row)
    return rows


def comparison_markdown(metrics: dict[str, Any], models: Iterable[str] = COMPARED,
                        difference: tuple[str, str] = ("fused", "clm")) -> str:
    """:func:`heldout_comparison` as the Markdown table a job prints at its end ('' when nothing was scored)."""
    rows = heldout_comparison(metrics, models=models, difference=difference)
    return to_markdown([{k: v for k, v in r.items() if k != "run"} for r in rows]) if rows else ""


def heldout_rows(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """:func:`heldout_comparison` of every run (``.name``, ``.metrics``) that has held-out scores."""
    return [row for run in runs for row in heldout_comparison(run.metrics, run.name)]
