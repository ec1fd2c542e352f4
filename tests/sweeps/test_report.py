"""fusionlab.report on hand-built run dirs: parsing, grids, curves, incomplete runs and its errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.report import build_report, read_report_csv, read_step_logs
from fusionlab.report.__main__ import main as report_main
from fusionlab.report.collect import parse_override
from fusionlab.report.plots import heatmap_grid


def make_run(d: Path, overrides: list[str], metrics: dict | None, objective: str | None = None,
             multirun: bool = True) -> Path:
    """A job dir as ``fusionlab.run`` leaves it (metrics.json None: a killed job)."""
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / ".hydra" / "config.yaml").write_text(f"job: ensemble\nobjective: {objective or 'null'}\n")
    (d / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {'MULTIRUN' if multirun else 'RUN'}\n")
    if metrics is not None:
        (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def test_parse_override():
    assert parse_override("ensemble.topk=10") == ("ensemble.topk", 10)
    assert parse_override("+distill.lam=0.5") == ("distill.lam", 0.5)
    assert parse_override("++task.path=null") == ("task.path", "null")
    assert parse_override("+experiment=eva_addsub") == ("experiment", "eva_addsub")
    assert parse_override("ensemble.drop=[1,2]") == ("ensemble.drop", "[1,2]")
    assert parse_override("model.dtype=bfloat16") == ("model.dtype", "bfloat16")
    assert parse_override("generation.do_sample=true") == ("generation.do_sample", True)


def test_heatmap_grid_means_counts_and_failures():
    rows = [
        {"status": "ok", "x": 10, "y": 3, "acc": 0.5},
        {"status": "ok", "x": 10, "y": 3, "acc": 0.7},   # two seeds in one cell: mean 0.6
        {"status": "ok", "x": 320, "y": 3, "acc": 1.0},
        {"status": "failed", "x": 320, "y": 40},
        {"status": "ok", "x": 10, "y": 40, "acc": 0.25},
        {"status": "ok", "x": 2, "y": 40, "acc": None},  # no metric: counted as failed
    ]
    xs, ys, values, counts, failed = heatmap_grid(rows, "x", "y", "acc")
    assert xs == [2, 10, 320] and ys == [3, 40]      # numeric, not string, order
    assert values[0] == [None, pytest.approx(0.6), 1.0]
    assert values[1] == [None, 0.25, None]
    assert counts == [[0, 2, 1], [0, 1, 0]] and failed == [[0, 0, 0], [1, 0, 1]]


def test_report_of_an_eva_grid_with_a_killed_job(tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}\n")
    accs = {(10, 3): 0.5, (10, 40): 0.25, (320, 3): 0.75}
    for i, ((topk, drop), acc) in enumerate(accs.items()):
        make_run(sweep / str(i), ["+experiment=eva_addsub", f"ensemble.topk={topk}", f"ensemble.drop={drop}"],
                 {"job": "ensemble", "ensemble_accuracy": acc, "n": 4, "status": "ok"}, "ensemble_accuracy")
    make_run(sweep / "3", ["+experiment=eva_addsub", "ensemble.topk=320", "ensemble.drop=40"], None, "ensemble_accuracy")
    report = build_report([sweep])
    assert report.out_dir == sweep / "report" and report.metric == "ensemble_accuracy"
    assert set(report.files) == {"heatmap_topk_drop.png", "report.csv", "report.md"}
    rows = read_report_csv(sweep / "report" / "report.csv")
    assert [r["run"] for r in rows] == ["sweep/0", "sweep/1", "sweep/2", "sweep/3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "incomplete"]
    assert [(r["ensemble.topk"], r["ensemble.drop"], r["ensemble_accuracy"]) for r in rows] == [
        (10, 3, 0.5), (10, 40, 0.25), (320, 3, 0.75), (320, 40, None)]
    md = (sweep / "report" / "report.md").read_text()
    assert "Highest `ensemble_accuracy`: 0.75 (ensemble.topk=320, ensemble.drop=3)" in md
    assert "`sweep/3` (incomplete)" in md and "![heatmap_topk_drop.png](heatmap_topk_drop.png)" in md
    # a second report over the same dir ignores the first one's outputs
    assert len(build_report([sweep]).rows) == 4


@pytest.mark.parametrize("metrics_bytes,reason", [(b"[1, 2]", "metrics.json holds a list, not an object"),
                                                   (b"\xff\xfe{", "unreadable metrics.json"),
                                                   (b'{"acc": 0.5', "unreadable metrics.json")])
def test_a_damaged_run_dir_is_a_failed_row_not_a_crash(tmp_path, metrics_bytes, reason):
    """One damaged job (a half-written or foreign metrics.json, garbage .hydra files) must not stop the report of
    the others: its row is marked failed with what is wrong."""
    sweep = tmp_path / "sweep"
    make_run(sweep / "0", ["ensemble.topk=10"], {"acc": 0.5, "status": "ok"})
    bad = make_run(sweep / "1", ["ensemble.topk=20"], None)
    (bad / "metrics.json").write_bytes(metrics_bytes)
    for name in ("overrides.yaml", "hydra.yaml", "config.yaml"):
        (bad / ".hydra" / name).write_text(": : :\n" if name == "overrides.yaml" else "- a list\n")
    report = build_report([sweep])
    rows = {r["run"]: r for r in read_report_csv(sweep / "report" / "report.csv")}
    assert rows["sweep/0"]["status"] == "ok" and rows["sweep/0"]["acc"] == 0.5
    assert rows["sweep/1"]["status"] == "failed" and reason in rows["sweep/1"]["error"]
    assert len(report.rows) == 2


def test_training_curves_from_lightning_and_tracker_logs(tmp_path):
    run = make_run(tmp_path / "run", ["+experiment=fusechat_pairwise"],
                   {"job": "distill", "final/train_loss": 1.5, "status": "ok"}, multirun=False)
    version = run / "csv" / "version_0"
    version.mkdir(parents=True)
    # Lightning's CSVLogger: sparse rows, one per logging call
    (version / "metrics.csv").write_text("epoch,lr-AdamW,step,train/loss\n"
                                         "0,0.001,0,\n0,,0,2.5\n0,,1,2.0\n0,,2,1.5\n")
    (run / "log.csv").write_text("step,eval/accuracy\n2,0.25\n4,0.5\n")
    series = read_step_logs(run)
    assert series["train/loss"] == [(0.0, 2.5), (1.0, 2.0), (2.0, 1.5)]
    assert series["eval/accuracy"] == [(2.0, 0.25), (4.0, 0.5)]
    assert "lr-AdamW" not in series and "epoch" not in series  # one point / bookkeeping
    report = build_report([run], tmp_path / "out")
    assert report.files["curves.png"].stat().st_size > 1000
    assert report.rows[0]["run"] == "run" and report.rows[0]["experiment"] == "fusechat_pairwise"


def test_errors_name_the_dir_and_the_fix(tmp_path, capsys):
    with pytest.raises(FusionlabError, match="No runs below .*multiruns"):
        build_report([tmp_path])
    with pytest.raises(FusionlabError, match="is not a directory"):
        build_report([tmp_path / "missing"])
    make_run(tmp_path / "r", [], {"job": "evaluate", "accuracy": 1.0, "status": "ok"})
    with pytest.raises(FusionlabError, match=r"--metric 'acuracy' .* \['accuracy', 'job', 'status'\]"):
        build_report([tmp_path / "r"], metric="acuracy")
    assert report_main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fusionlab.report: error: ") and "missing" in err and "Traceback" not in err


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path, capsys):
    """--out under /proc (nothing can be created there, even as root) was a FileNotFoundError traceback."""
    make_run(tmp_path / "r", [], {"job": "evaluate", "accuracy": 1.0, "status": "ok"})
    assert report_main([str(tmp_path / "r"), "--out", "/proc/fusionlab_no/report"]) == 2
    err = capsys.readouterr().err
    assert "'/proc/fusionlab_no/report' cannot be created" in err and "--out" in err
