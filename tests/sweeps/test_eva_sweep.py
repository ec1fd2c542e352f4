"""The headline sweep: EVA topk × drop on the embedded models, then the report with its heatmap."""
from __future__ import annotations

import json

import pytest

from fusionlab.report import read_report_csv
from fusionlab.report.__main__ import main as report_main
from tests.sweeps.conftest import fusionlab_multirun
from tests.sweeps.wandb_offline import offline_runs


@pytest.mark.slow
def test_eva_topk_drop_2x2_sweep_and_report(tmp_path):
    sweep = tmp_path / "eva_2x2"
    proc = fusionlab_multirun(["+experiment=eva_addsub", "ensemble.topk=10,320", "ensemble.drop=3,40",
                               "task.limit=1", "generation.max_new_tokens=4", "ensemble.eval_members=false"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]

    dirs = sorted(p for p in sweep.iterdir() if p.name.isdigit())
    assert [d.name for d in dirs] == ["0", "1", "2", "3"]
    grid = set()
    for d in dirs:
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["status"] == "ok" and metrics["job"] == "ensemble" and metrics["n"] == 1
        assert 0.0 <= metrics["ensemble_accuracy"] <= 1.0
        cfg = (d / ".hydra" / "overrides.yaml").read_text()
        grid.add(tuple(x for x in ("topk=10", "topk=320", "drop=3", "drop=40") if f"ensemble.{x}\n" in cfg))
    assert grid == {("topk=10", "drop=3"), ("topk=10", "drop=40"), ("topk=320", "drop=3"), ("topk=320", "drop=40")}

    runs = offline_runs(sweep)  # one W&B run per job, four distinct runs in one group, all finished
    assert len(runs) == 4 and len({r["id"] for r in runs}) == 4
    assert {r["group"] for r in runs} == {f"ensemble-{sweep.name}"}
    assert sorted(r["path"].relative_to(sweep).parts[0] for r in runs) == ["0", "1", "2", "3"]
    assert all(r["exit_code"] == 0 and "ensemble_accuracy" in r["history_keys"] for r in runs)

    assert report_main([str(sweep)]) == 0
    rows = read_report_csv(sweep / "report" / "report.csv")
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert {(r["ensemble.topk"], r["ensemble.drop"]) for r in rows} == {(10, 3), (10, 40), (320, 3), (320, 40)}
    for r in rows:
        metrics = json.loads((sweep / r["run"].split("/")[1] / "metrics.json").read_text())
        assert r["ensemble_accuracy"] == metrics["ensemble_accuracy"]
    assert (sweep / "report" / "heatmap_topk_drop.png").stat().st_size > 1000
    assert "Metric: `ensemble_accuracy`" in (sweep / "report" / "report.md").read_text()
