"""The CLI end to end through ``python -m fusionlab.run``, and its answers to bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fusionlab.io import read_jsonl
from tests.conftest import REPO

TINY_EVAL = ["+experiment=eval_addsub", "model=tiny_llama", "task.limit=3", "generation.max_new_tokens=6"]


def fusionlab_run(args: list[str], tmp_path: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "fusionlab.run", *args, f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_eval_writes_metrics_predictions_and_offline_wandb(tmp_path):
    proc = fusionlab_run(TINY_EVAL, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["job"] == "evaluate"
    assert metrics["task"] == "addsub" and metrics["model"] == "tiny_llama" and metrics["n"] == 3
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["tokens_per_s"] > 0
    rows = read_jsonl(tmp_path / "predictions.jsonl")
    assert len(rows) == 3
    assert set(rows[0]) >= {"prompt", "output", "extracted", "gold", "correct"}
    assert sum(r["correct"] for r in rows) / 3 == pytest.approx(metrics["accuracy"])
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline W&B run is written"
    assert (tmp_path / "log.csv").read_text().startswith("step,")
    # the numbers the job declares up front (objective check) are exactly the ones it wrote
    from fusionlab.jobs.evaluate import metric_names

    numbers = {k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(metric_names(OmegaConf.create({"task": {"name": "addsub"}}))) == numbers - {"wall_s"}


@pytest.mark.slow
def test_eval_addsub_on_embedded_smollm2(tmp_path):
    proc = fusionlab_run(["+experiment=eval_addsub", "task.limit=2", "generation.max_new_tokens=24"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model"] == "smollm2_135m" and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("args,needle", [
    (["model=hf", "model.path=/no/such/model_dir"], "/no/such/model_dir"),
    (["task.path=/no/such/data.jsonl"], "/no/such/data.jsonl"),
    (["job=nonsense"], "Unknown job 'nonsense'"),
    (["model.dtype=float33"], "float33"),
])
def test_user_errors_are_one_paragraph_exit_2(tmp_path, args, needle):
    proc = fusionlab_run([*TINY_EVAL, *args], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"
    assert not (tmp_path / "predictions.jsonl").exists()


def test_empty_data_file(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    proc = fusionlab_run([*TINY_EVAL, f"task.path={data}"], tmp_path / "run")
    assert proc.returncode == 2 and "no examples" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,needle", [
    (["model=no_such_model"], "no_such_model"),
    (["+experiment=no_such_experiment"], "no_such_experiment"),
    (["generation.max_new_tokenz=3"], "max_new_tokenz"),
])
def test_unknown_config_options_fail_at_compose(tmp_path, args, needle):
    proc = fusionlab_run([*TINY_EVAL, *args], tmp_path)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr


# A model that cannot load: a check that fires first proves it fired before any model was loaded.
UNLOADABLE = ["+experiment=eval_addsub", "model=hf", "model.path=/no/such/model_dir"]


@pytest.mark.parametrize("args,needles", [
    (["task.limt=2"], ["task.limt", "TaskConfig"]),  # unknown key
    (["+model.foo=1"], ["['foo']", "trust_remote_code"]),  # a key force-added to a typed node
    (["task.limit=abc"], ["task.limit", "'abc'"]),  # wrong type
    (["task.limit=0"], ["task.limit=0"]),  # bad value
    (["generation.batch_size=0"], ["generation.batch_size=0"]),
    (["model.dtype=float33"], ["float33", "bfloat16"]),
    (["model.device=gpu0"], ["model.device='gpu0'", "cuda:N"]),
    (["model=no_such_model"], ["model/no_such_model", "smollm2_135m"]),  # unknown group option
    (["job=nonsense"], ["Unknown job 'nonsense'", "evaluate"]),
    (["objective=nosuch"], ["objective='nosuch'", "'accuracy'", "'tokens_per_s'"]),  # objective it never writes
])
def test_config_errors_exit_2_before_any_model_loads(tmp_path, args, needles):
    proc = fusionlab_run([*UNLOADABLE, *args], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("fusionlab: error: ") and "Traceback" not in proc.stderr
    assert all(n in proc.stderr for n in needles), proc.stderr
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "predictions.jsonl").exists()


def test_objective_checked_again_when_the_job_ends(tmp_path):
    """Jobs that do not declare metric_names: the objective is checked against what they wrote, never a silent None."""
    from fusionlab.errors import FusionlabError
    from fusionlab.run import _objective_error

    err = _objective_error(OmegaConf.create({"job": "merge", "objective": "ppl"}), ["tensors", "wall_s"], "wrote to")
    assert isinstance(err, FusionlabError) and "objective='ppl'" in str(err) and "['tensors', 'wall_s']" in str(err)
    assert _objective_error(OmegaConf.create({"job": "merge", "objective": "tensors"}), ["tensors"], "wrote to") is None
    assert _objective_error(OmegaConf.create({"job": "merge", "objective": None}), [], "wrote to") is None


def test_distill_job_with_the_default_wandb_logger(tmp_path):
    """The default logger group (W&B offline + CSV) on a fit: W&B's config holds the job's ``_target_`` nodes,
    which must be logged as config — built recursively they crashed every distill run at ``trainer.fit``."""
    from tests.distill.test_distill_job import TINY
    from tests.sweeps.wandb_offline import offline_runs

    tiny = [a for a in TINY if not a.startswith("logger=")]
    proc = fusionlab_run(["+experiment=fusechat_pairwise", *tiny, "logger=wandb", "trainer.max_steps=1",
                          "distill.baseline=null", "distill.eval.task=null", "distill.data.heldout=4",
                          f"distill.cache_dir={tmp_path / 'cache'}", "trainer.enable_progress_bar=false"],
                         tmp_path / "run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = offline_runs(tmp_path / "run")
    assert len(runs) == 1 and runs[0]["job_type"] == "distill" and runs[0]["exit_code"] == 0
    assert {"train/loss", "train/clm", "train/fusion"} <= runs[0]["history_keys"]
