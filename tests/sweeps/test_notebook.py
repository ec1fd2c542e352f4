"""notebooks/analysis.ipynb runs top to bottom on the report of a real sweep."""
from __future__ import annotations

import os

import nbformat
from nbclient import NotebookClient

from fusionlab.report import build_report
from tests.conftest import REPO


def test_analysis_notebook_executes_on_a_real_report(failing_sweep, tmp_path, monkeypatch):
    sweep, _ = failing_sweep
    report = build_report([sweep], tmp_path / "report")
    out = tmp_path / "figures"
    monkeypatch.setenv("FUSIONLAB_REPORT", str(report.out_dir))
    monkeypatch.setenv("FUSIONLAB_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(REPO / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "4 runs from" in text and "failed: 2" in text and "ok: 2" in text
    assert "metric: accuracy" in text and "swept: ['generation.max_new_tokens', 'task.path']" in text
    assert (out / "metric_per_run.png").stat().st_size > 1000
    assert (out / "heatmap.png").stat().st_size > 1000
