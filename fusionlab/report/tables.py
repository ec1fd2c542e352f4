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


def heldout_rows(runs: Iterable[Any]) -> list[dict[str, Any]]:
    """Per distill run with held-out scores: pivot / CLM baseline / fused side by side (value [95% interval]),
    and the paired fused − CLM difference, for CE and for the task metric when there is one."""
    rows = []
    for run in runs:
        m = run.metrics
        for split in ("heldout", "dev"):
            if not any(k.startswith(f"{split}/ce/") for k in m):
                continue
            metric_names = sorted({k.split("/")[1] for k in m if k.startswith(f"{split}/")
                                   and k.count("/") == 2 and k.split("/")[2] in COMPARED} - {"ppl"})
            for metric in metric_names:
                row = {"run": run.name, "split": split, "metric": metric,
                       "n": m.get(f"{split}/conversations") if metric == "ce" else None}
                for model in COMPARED:
                    row[model] = _with_interval(m, f"{split}/{metric}/{model}")
                row["fused − clm"] = _with_interval(m, f"{split}/{metric}_diff/fused_minus_clm")
                rows.append(row)
    return rows
