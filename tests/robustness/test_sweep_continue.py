"""A sweep continued in its own sweep dir never clobbers earlier jobs: new jobs are numbered after them."""
from __future__ import annotations

import json

import optuna

from tests.sweeps.conftest import TINY, fusionlab_multirun

FAST = [*TINY, "task.limit=1", "logger=none"]


def _snapshot(sweep):
    return {p.relative_to(sweep).as_posix(): p.read_bytes() for p in sweep.glob("[0-9]*/**/*") if p.is_file()}


def test_multirun_continued_in_its_dir_numbers_after_existing_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    first = fusionlab_multirun([*FAST, "generation.max_new_tokens=1,2"], sweep)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(sweep)
    second = fusionlab_multirun([*FAST, "generation.max_new_tokens=3"], sweep)
    assert second.returncode == 0, second.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2"]
    after = _snapshot(sweep)
    assert {k: after[k] for k in before} == before, "every file of the earlier jobs is byte-identical"
    assert "generation.max_new_tokens=3" in (sweep / "2" / ".hydra" / "overrides.yaml").read_text()
    assert json.loads((sweep / "2" / "metrics.json").read_text())["status"] == "ok"


def test_optuna_search_continued_keeps_every_trial(tmp_path):
    """The study and the dirs agree after a continuation: trial n's files are in dir n, none overwritten."""
    sweep = tmp_path / "optuna"
    search = ["+experiment=eval_addsub", "model=tiny_llama", "logger=none", "generation.max_new_tokens=2",
              "objective=accuracy", "+hparams_search=eva_optuna", "hydra.sweeper.params=null",
              "task.limit=choice(1,2)", "hydra/sweeper/sampler=random", "hydra.sweeper.n_trials=1"]
    first = fusionlab_multirun([*search, "hydra.sweeper.sampler.seed=0"], sweep)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(sweep)
    second = fusionlab_multirun([*search, "hydra.sweeper.sampler.seed=1"], sweep)
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name="eva_topk_drop", storage=f"sqlite:///{sweep}/optuna.db")
    assert [t.number for t in study.trials] == [0, 1]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1"]
    after = _snapshot(sweep)
    assert {k: after[k] for k in before} == before
    for trial in study.trials:
        overrides = (sweep / str(trial.number) / ".hydra" / "overrides.yaml").read_text()
        assert f"task.limit={trial.params['task.limit']}" in overrides
        assert json.loads((sweep / str(trial.number) / "metrics.json").read_text())["n"] == trial.params["task.limit"]
