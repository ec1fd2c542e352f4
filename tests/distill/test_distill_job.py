"""Trainer configs, and the distill job end to end (tiny random models with the real tokenizers)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_llama", "model@distill.sources.gemma3_270m=tiny_gemma", "logger=csv",
        "distill.data.limit=6", "distill.data.max_length=48", "distill.shard_size=4",
        "distill.mapping.min_vocab_coverage=0"]  # random tiny models: their top-k ids are noise


@pytest.mark.parametrize("name,strategy", [
    ("cpu", None), ("gpu", None), ("ddp", "DDPStrategy"), ("fsdp", "FSDPStrategy"),
    ("deepspeed_z2", "DeepSpeedStrategy"), ("deepspeed_z3", "DeepSpeedStrategy"),
    ("deepspeed_z3_offload", "DeepSpeedStrategy")])
def test_trainer_configs_compose_and_instantiate(compose, name, strategy):
    from hydra.utils import instantiate

    cfg = compose(["+experiment=fusechat_pairwise", f"trainer={name}"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if strategy is None:
        assert cfg.trainer.strategy == "auto"
    else:
        obj = instantiate(cfg.trainer.strategy)
        assert type(obj).__name__ == strategy
        if name == "deepspeed_z3_offload":
            assert obj.config["zero_optimization"]["stage"] == 3
            assert obj.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        if name == "deepspeed_z3":  # plain ZeRO-3: nothing offloaded
            assert obj.config["zero_optimization"]["stage"] == 3
            assert "offload_optimizer" not in obj.config["zero_optimization"]
        if name == "fsdp":  # the wrap policy follows the pivot, set at fit time (tests/distill/test_scale.py)
            assert obj.kwargs.get("auto_wrap_policy") is None
    if name in ("cpu", "ddp"):
        extra = {"accelerator": "cpu", "devices": 2 if name == "ddp" else 1, "precision": "32-true"}
        trainer = instantiate(cfg.trainer, **extra, logger=False)
        assert trainer.max_steps == cfg.trainer.max_steps == 48  # the experiment's CPU-sized budget


def test_experiment_keys_land_at_top_level(compose):
    cfg = compose(["+experiment=fusechat_pairwise"])
    assert cfg.job == "distill" and cfg.distill.pivot.name == "smollm2_135m"
    assert list(cfg.distill.sources) == ["gemma3_270m"] and cfg.distill.sources.gemma3_270m.name == "gemma3_270m"
    assert cfg.distill.mapping.method == "ms" and cfg.align_method is None  # FuseChat mapping: its own group
    assert set(cfg.callbacks) >= {"model_checkpoint", "lr_monitor"}


def test_bad_options_fail_with_their_name(compose, tmp_path):
    from fusionlab.errors import FusionlabError
    from fusionlab.run import run

    cfg = compose(["+experiment=fusechat_pairwise", *TINY, "+distill.lamda=0.5"], tmp_path / "a")
    with pytest.raises(FusionlabError, match="lamda"):
        run(cfg)


def test_distill_job_runs_and_resumes_from_last_checkpoint(compose, tmp_path):
    from fusionlab.run import run

    cache = tmp_path / "cache"
    common = ["+experiment=fusechat_pairwise", *TINY, f"distill.cache_dir={cache}", "distill.baseline=null",
              "distill.data.heldout=6", "distill.data.dev=true", "distill.data.dev_size=6", "distill.eval.task=null",
              "objective=dev/ce/fused",  # dev=true scores the dev slice: its metrics are dev/*
              "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.enable_progress_bar=false"]
    out = tmp_path / "run"
    m1 = run(compose([*common, "trainer.max_steps=2"], out))
    assert m1["fit/steps"] == 2 and m1["fit/resumed"] is False
    # one conversation's answer starts after the 48-token cut: dropped and counted, not trained on
    assert m1["repr/pivot_kept"] == 5 and m1["repr/pivot_dropped_no_assistant"] == 1
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "model" / "config.json").exists()
    assert m1["align/samples"] == 5 and 0.5 < m1["align/gemma3_270m/exact_rate"] <= 1
    assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
    from omegaconf import OmegaConf  # the distill Optuna search's default objective is written by every run

    objective = OmegaConf.load(REPO / "conf" / "hparams_search" / "distill_optuna.yaml").objective
    assert isinstance(m1[objective], float) and m1[objective] > 0
    m2 = run(compose([*common, "trainer.max_steps=4"], out))  # same dir: resumes at step 2
    assert m2["fit/resumed"] is True and m2["fit/steps"] == 4
    assert m2["fit/steps_this_run"] == 2 and m2["fit/tokens"] > m2["fit/tokens_this_run"] > 0  # total vs this process
    assert 0.1 < m2["fit/tokens_per_s"] / m1["fit/tokens_per_s"] < 10  # this run's tokens over this run's seconds
    assert m2["time/representations_s"] < m1["time/representations_s"] + 30  # caches reused


def _step_losses(run_dir: Path, key: str) -> dict[int, float]:
    import csv

    rows = list(csv.DictReader(open(next(run_dir.glob("csv/*/metrics.csv")))))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


def test_lam_one_fit_equals_the_clm_baseline_and_heldout_is_never_trained_on(compose, tmp_path):
    """distill.lam=1 is plain CLM, so the fused run and its CLM twin (fresh pivot, same records, seed, optimizer,
    steps) must agree step by step and on every held-out number: this catches a twin trained from the already
    trained pivot, on other data or in another order."""
    from fusionlab.run import run

    out = tmp_path / "run"
    m = run(compose(["+experiment=fusechat_pairwise", *TINY, f"distill.cache_dir={tmp_path / 'cache'}",
                     "distill.lam=1.0", "distill.baseline=clm", "distill.data.heldout=6", "trainer.max_steps=3",
                     "~callbacks.model_checkpoint", "trainer.enable_checkpointing=false",
                     "trainer.enable_progress_bar=false", "distill.eval.task=addsub_eq", "distill.eval.task_limit=3"],
                    out))
    fused = _step_losses(out, "train/loss_step") or _step_losses(out, "train/loss")
    twin = _step_losses(out / "baseline_clm", "baseline/train/loss_step") or \
        _step_losses(out / "baseline_clm", "baseline/train/loss")
    assert len(fused) == 3 and fused == twin
    assert m["final/train_loss"] == m["baseline/final/train_loss"]
    assert m["heldout/ce/fused"] == m["heldout/ce/clm"] and m["heldout/ce_diff/fused_minus_clm"] == 0.0
    assert m["heldout/ce/pivot"] != m["heldout/ce/fused"]  # both trained 3 steps away from the pivot
    assert m["heldout/conversations"] + m["heldout/dropped_no_assistant"] == 6  # replies cut off at 48 tokens
    assert m["heldout/conversations"] >= 3 and 0 <= m["heldout/accuracy/fused"] <= 1
    split = json.loads((out / "split.json").read_text())
    assert len(split["heldout"]) == 6 and not set(split["heldout"]) & set(split["train"])
    fused_ids = json.loads(next((tmp_path / "cache").glob("fused-*.safetensors.json")).read_text())
    assert set(fused_ids) <= set(split["train"])  # held-out conversations have no representations at all
    assert m["fit/tokens_per_s"] > 0 and "fit/overhead_vs_clm" in m


def test_checkpoint_callbacks_report_into_the_job_metrics(compose, tmp_path):
    """EVA eval runs at each checkpoint of a fit without validation; its last value is a `final/` metric."""
    from fusionlab.run import run

    tiny_aux = ("{source: random, tokenizer: smollm2_135m, use_chat_template: false, config: {model_type: llama, "
                "hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1, num_attention_heads: 4, "
                "num_key_value_heads: 2}}")
    cfg = compose(["+experiment=fusechat_pairwise", *TINY, f"distill.cache_dir={tmp_path / 'cache'}",
                   "callbacks=[default,eva_eval]", "~callbacks.eva_eval.aux.gemma3_270m",
                   f"+callbacks.eva_eval.aux.tiny={tiny_aux}", "callbacks.eva_eval.limit=1",
                   "callbacks.eva_eval.max_new_tokens=3", f"+callbacks.eva_eval.cache_dir={tmp_path / 'align'}",
                   "callbacks.model_checkpoint.every_n_train_steps=2", "trainer.max_steps=2",
                   "trainer.enable_progress_bar=false"], tmp_path / "run")
    metrics = run(cfg)
    assert 0.0 <= metrics["final/eva_eval_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["final/eva_eval_accuracy"] == \
        metrics["final/eva_eval_accuracy"]


def test_heldout_eval_callback_at_the_last_checkpoint_equals_the_end_of_fit_score(compose, tmp_path):
    """The callback scores through the end-of-fit function on the same conversations: with no step between the
    last checkpoint and the end of the fit, every held-out number agrees to the float; the .ckpt keeps them."""
    import torch

    from fusionlab.run import run

    out = tmp_path / "run"
    m = run(compose(["+experiment=fusechat_pairwise", *TINY, f"distill.cache_dir={tmp_path / 'cache'}",
                     "distill.baseline=null", "distill.eval.task=null", "distill.data.heldout=6",
                     "callbacks=[default,heldout_eval]", "callbacks.model_checkpoint.every_n_train_steps=2",
                     "trainer.max_steps=4", "trainer.enable_progress_bar=false"], out))
    assert m["fit/steps"] == 4
    for key in ("heldout/ce/fused", "heldout/ce/fused_low", "heldout/ce/fused_high", "heldout/ppl/fused"):
        assert m[f"final/{key.replace('/', '_')}"] == m[key], key  # the callback's value at step 4
    ckpt = torch.load(out / "checkpoints" / "step000004.ckpt", weights_only=False)
    assert ckpt["heldout"]["heldout/ce/fused"] == m["heldout/ce/fused"]
    logged = _step_losses(out, "heldout/ce/fused")  # the loggers got it at both checkpoints (CSV: text floats)
    assert sorted(logged) == [2, 4] and logged[4] == pytest.approx(m["heldout/ce/fused"], rel=1e-6)
    assert logged[2] != logged[4]  # two steps of training moved it: a real evaluation at each checkpoint
    assert m["heldout/ce/pivot"] != m["heldout/ce/fused"]


def test_ddp_fit_with_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    # the source reuses the pivot's tokenizer here: each rank then loads one small tokenizer, not Gemma's 262k
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", *TINY,
           "model@distill.sources.gemma3_270m=tiny_llama", "distill.sources.gemma3_270m.seed=1",
           f"distill.cache_dir={tmp_path / 'cache'}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.precision=32-true", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
           f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["fit/world_size"] == 2 and m["fit/steps"] == 2 and m["status"] == "ok"


@pytest.mark.slow
def test_cli_fusechat_pairwise_with_real_models(tmp_path):
    out = tmp_path / "real"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", "distill.data.limit=2",
           "distill.data.max_length=48", f"distill.cache_dir={tmp_path / 'cache'}", "trainer.max_steps=1",
           "~callbacks.model_checkpoint", "trainer.enable_checkpointing=false", "distill.export_model=false",
           "trainer.enable_progress_bar=false", "logger=csv", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["fit/steps"] == 1 and m["align/gemma3_270m/exact_rate"] > 0.8
    assert m["align/gemma3_270m/vocab_coverage"] > 0.5  # real models' top-k tokens are mostly shared words
    assert 0 < m["final/train_loss"] < 20
    console = proc.stdout + proc.stderr  # the run ends with the comparison a person reads: the same numbers
    assert "held-out comparison" in console
    ce_row = next(line for line in console.splitlines() if line.startswith("| heldout | ce |"))
    assert f"{m['heldout/ce/fused']:.4f} [" in ce_row and f"{m['heldout/ce_diff/fused_minus_clm']:.4f} [" in ce_row
    assert any(line.startswith("| heldout | addsub_eq accuracy | 40 |") for line in console.splitlines())


# sharded fits on a GPU (fsdp, deepspeed_z2/z3) and their consolidated export: tests/distill/test_scale.py
