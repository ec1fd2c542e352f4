"""Launcher and Optuna search configs: they compose against the real experiments, and run for real."""
from __future__ import annotations

import json

import optuna
import pytest
import yaml
from hydra.utils import get_class
from omegaconf import OmegaConf

from tests.sweeps.conftest import TINY, fusionlab_multirun

# our launcher configs share their names with the plugins' schemas on purpose (typos fail); see run.py
pytestmark = pytest.mark.filterwarnings("ignore:\\s*'hydra/launcher/:UserWarning")


@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "submitit_slurm"])
def test_launchers_compose(compose, launcher):
    cfg = compose(["+experiment=eval_addsub", f"hydra/launcher={launcher}"])
    get_class(cfg.hydra.launcher._target_)  # the plugin is installed and the path is right
    if launcher == "submitit_slurm":
        assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.gpus_per_node == 1


def test_launcher_typos_fail_at_compose(compose):
    with pytest.raises(Exception, match="n_jobz"):
        compose(["+experiment=eval_addsub", "hydra/launcher=joblib", "hydra.launcher.n_jobz=3"])


@pytest.mark.parametrize("experiment,search,keys,direction", [
    ("eva_addsub", "eva_optuna", ["ensemble.topk", "ensemble.drop"], "maximize"),
    ("fusechat_pairwise", "distill_optuna", ["distill.lam", "distill.temperature"], "minimize"),  # a loss
])
def test_searches_sweep_keys_the_experiments_have(compose, experiment, search, keys, direction):
    cfg = compose([f"+experiment={experiment}", f"+hparams_search={search}"])
    sweeper = cfg.hydra.sweeper
    assert sorted(sweeper.params) == sorted(keys)
    for key in keys:
        assert OmegaConf.select(cfg, key) is not None, key
    assert sweeper.direction == direction and sweeper.max_failure_rate == 1.0
    assert sweeper.storage == f"sqlite:///{cfg.hydra.sweep.dir}/optuna.db"
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN" and cfg.objective


def test_optuna_search_stores_its_study_and_survives_failed_trials(tmp_path):
    """Two seeded random trials of the tiny eval: the first draws the unknown task and fails, the second runs."""
    sweep = tmp_path / "optuna"
    proc = fusionlab_multirun([*TINY, "task.limit=1", "generation.max_new_tokens=2", "logger=none",
                               "objective=accuracy", "+hparams_search=eva_optuna", "hydra.sweeper.params=null",
                               "hydra/sweeper/sampler=random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=2",
                               "task.name=choice(addsub,no_such_task)"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="eva_topk_drop", storage=f"sqlite:///{sweep}/optuna.db")
    assert [(t.params["task.name"], t.state.name) for t in study.trials] == [("no_such_task", "FAIL"),
                                                                              ("addsub", "COMPLETE")]
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_params"] == {"task.name": "addsub"} and best["best_value"] == study.best_value
    metrics = [json.loads((sweep / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert [m["status"] for m in metrics] == ["failed", "ok"]
    assert metrics[1]["accuracy"] == study.best_value


def test_submitit_local_launcher_runs_a_job(tmp_path):
    sweep = tmp_path / "submitit"
    proc = fusionlab_multirun([*TINY, "task.limit=1", "generation.max_new_tokens=2", "logger=none",
                               "hydra/launcher=submitit_local"], sweep)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["n"] == 1
    logs = list((sweep / ".submitit").rglob("*_log.out"))
    assert logs, "submitit ran the job in its own process and kept its log"
