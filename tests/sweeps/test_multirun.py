"""A real multirun with failing jobs: every job gets its dir, metrics.json and W&B run; the report tabulates all."""
from __future__ import annotations

import json

from fusionlab.report import read_report_csv
from fusionlab.report.__main__ import main as report_main
from tests.sweeps.wandb_offline import offline_runs


def _jobs(sweep):
    jobs = {}
    for d in sorted(p for p in sweep.iterdir() if p.name.isdigit()):
        overrides = (d / ".hydra" / "overrides.yaml").read_text()
        metrics = json.loads((d / "metrics.json").read_text())
        jobs[d.name] = (overrides, metrics)
    return jobs


def test_failing_job_is_recorded_and_the_sweep_goes_on(failing_sweep):
    sweep, proc = failing_sweep
    jobs = _jobs(sweep)
    assert sorted(jobs) == ["0", "1", "2", "3"], proc.stderr[-3000:]
    failed = {k for k, (o, m) in jobs.items() if m["status"] == "failed"}
    ok = {k for k, (o, m) in jobs.items() if m["status"] == "ok"}
    assert failed == {k for k, (o, m) in jobs.items() if "task.path=/nonexistent" in o} and len(failed) == 2
    assert len(ok) == 2
    for k in failed:
        assert "/nonexistent" in jobs[k][1]["error"] and jobs[k][1]["job"] == "evaluate"
    for k in ok:
        assert jobs[k][1]["n"] == 2 and 0.0 <= jobs[k][1]["accuracy"] <= 1.0
    # Hydra's basic launcher runs every job, then re-raises the first failure: one paragraph naming every failed
    # job, its overrides and the fix, exit 2 — never a traceback.
    assert proc.returncode == 2
    summary = proc.stderr.strip().splitlines()[-1]
    assert summary.startswith("fusionlab: error: 2 job(s) of the multirun failed, the others ran")
    assert summary.count("task.path=/nonexistent") >= 2 and f"python -m fusionlab.report {sweep}" in summary
    assert "Traceback" not in proc.stderr

    # One offline W&B run per job that got as far as logging, all in the sweep's group, each finished.
    runs = offline_runs(sweep)
    assert len(runs) == len(ok) == 2
    assert len({r["id"] for r in runs}) == 2
    assert {r["group"] for r in runs} == {f"evaluate-{sweep.name}"}
    assert all(r["exit_code"] == 0 and "accuracy" in r["history_keys"] for r in runs)
    assert {r["path"].relative_to(sweep).parts[0] for r in runs} == ok


def test_report_of_the_sweep_lists_every_job(failing_sweep, tmp_path, capsys):
    sweep, _ = failing_sweep
    out = tmp_path / "report"
    rc = report_main([str(sweep), "--out", str(out), "--heatmap", "generation.max_new_tokens,task.path", "--wandb"])
    assert rc == 0
    assert "4 runs (2 ok)" in capsys.readouterr().out
    rows = read_report_csv(out / "report.csv")
    assert len(rows) == 4
    assert [r["run"] for r in rows] == [f"{sweep.name}/{i}" for i in range(4)]
    by_cell = {(r["generation.max_new_tokens"], r["task.path"]): r for r in rows}
    assert set(by_cell) == {(2, "/nonexistent"), (2, "null"), (3, "/nonexistent"), (3, "null")}
    for (tokens, path), r in by_cell.items():
        metrics = json.loads((sweep / r["run"].split("/")[1] / "metrics.json").read_text())
        assert r["status"] == metrics["status"] == ("failed" if path == "/nonexistent" else "ok")
        assert r["accuracy"] == metrics.get("accuracy")
        assert r["model"] == "tiny_llama" and r["task.limit"] == 2 and r["experiment"] == "eval_addsub"
    md = (out / "report.md").read_text()
    assert md.count(f"| {sweep.name}/") == 4 and "2 failed" in md and "## Failed or unfinished runs" in md
    assert (out / "heatmap_max_new_tokens_path.png").stat().st_size > 1000
    # the report's own W&B run sits in the sweep's group and holds the table and the heatmap
    (run,) = offline_runs(out)
    assert run["group"] == f"evaluate-{sweep.name}" and run["job_type"] == "report"
    assert any(k.startswith("report/") for k in run["history_keys"])
    assert any(k.startswith("heatmap_max_new_tokens_path/") for k in run["history_keys"])
