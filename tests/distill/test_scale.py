"""Scale past one GPU: the fused set memory-mapped and read lazily, sharded strategies checked at job start,
FSDP wrapped by the pivot's own decoder layer, consolidated HF export from FSDP / DeepSpeed (GPU tests)."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fusionlab.distill.dist_align import FusedSet, load_fused, save_fused
from fusionlab.distill.strategy import check_strategy_devices, configure_wrap_policy, decoder_layer_classes
from fusionlab.errors import FusionlabError

REPO = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_llama", "model@distill.sources.gemma3_270m=tiny_llama", "distill.sources.gemma3_270m.seed=1",
        "logger=csv", "distill.data.limit=4", "distill.data.heldout=2", "distill.data.max_length=96",
        "distill.shard_size=4"]


def records(n=5, M=3, k=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L_ = int(rng.integers(3, 9))
        out.append({"id": f"r{i}", "input_ids": rng.integers(0, 50, L_), "assistant": rng.random(L_) > 0.3,
                    "target_ids": rng.integers(-1, 50, (M, L_, k)),
                    "target_logits": rng.normal(size=(M, L_, k)).astype(np.float32),
                    "ce": rng.random(M).astype(np.float32)})
    return out


def same(a, b):
    return a["id"] == b["id"] and all(np.array_equal(a[key], b[key]) for key in
                                      ("input_ids", "assistant", "target_ids", "target_logits", "ce"))


def test_lazy_fused_set_reads_the_same_records_from_a_memory_map(tmp_path):
    recs = records()
    save_fused(recs, tmp_path / "f.safetensors")
    lazy = load_fused(tmp_path / "f.safetensors")
    assert isinstance(lazy, FusedSet) and len(lazy) == 5
    assert all(isinstance(v, np.memmap) for v in lazy._tensors().values())  # nothing copied into RAM up front
    eager = load_fused(tmp_path / "f.safetensors", lazy=False)
    for r, a, b in zip(recs, lazy, eager):
        assert same(a, b) and np.array_equal(a["target_logits"], r["target_logits"])
    view = lazy[1:4]  # a view of the same file (the val/train split of FuseDataModule)
    assert [r["id"] for r in view] == ["r1", "r2", "r3"] and same(view[0], eager[1])
    kept = lazy.with_candidates([0, 2])
    assert kept[2]["target_ids"].shape[0] == 2 and np.array_equal(kept[2]["ce"], eager[2]["ce"][[0, 2]])
    clone = pickle.loads(pickle.dumps(view))  # DataLoader workers get the path, and map the file themselves
    assert clone._t is None and same(clone[2], eager[3])


def test_datamodule_trains_from_the_lazy_set(tmp_path):
    from fusionlab.distill.data import FuseDataModule

    save_fused(records(), tmp_path / "f.safetensors")
    dm = FuseDataModule(tmp_path / "f.safetensors", batch_size=2, val_size=1, candidates=[0, 1])
    assert isinstance(dm.train.records, FusedSet) and len(dm.train) == 4 and len(dm.val) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["target_ids"].shape[:2] == (2, 2)


def test_sharded_strategies_need_gpus():
    with pytest.raises(FusionlabError, match="FSDPStrategy.*0 visible GPU"):
        check_strategy_devices("lightning.pytorch.strategies.FSDPStrategy", "gpu", gpus=0)
    with pytest.raises(FusionlabError, match="DeepSpeedStrategy"):
        check_strategy_devices("lightning.pytorch.strategies.DeepSpeedStrategy", "cpu", gpus=8)
    check_strategy_devices("lightning.pytorch.strategies.DDPStrategy", "cpu", gpus=0)  # ddp runs on CPU
    check_strategy_devices(None, "cpu", gpus=0)
    check_strategy_devices("lightning.pytorch.strategies.FSDPStrategy", "gpu", gpus=2)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without GPUs")
def test_fsdp_job_fails_at_start_before_extraction(compose, tmp_path):
    from fusionlab.run import run

    cfg = compose(["+experiment=fusechat_pairwise", *TINY, f"distill.cache_dir={tmp_path / 'cache'}", "trainer=fsdp"],
                  tmp_path / "run")
    with pytest.raises(FusionlabError, match="trainer.strategy=FSDPStrategy"):
        run(cfg)
    assert not (tmp_path / "cache").exists()  # nothing extracted


def test_fsdp_wraps_the_pivots_own_decoder_layer(tiny_pair, compose):
    from hydra.utils import instantiate
    from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    (llama, _), (gemma, _) = tiny_pair
    assert decoder_layer_classes(llama) == {LlamaDecoderLayer}
    assert decoder_layer_classes(gemma) == {Gemma3DecoderLayer}
    strategy = instantiate(compose(["+experiment=fusechat_pairwise", "trainer=fsdp"]).trainer.strategy)
    assert strategy.kwargs.get("auto_wrap_policy") is None  # the config names no architecture
    configure_wrap_policy(types.SimpleNamespace(strategy=strategy), gemma)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Gemma3DecoderLayer}
    configure_wrap_policy(types.SimpleNamespace(strategy=strategy), llama)  # a given policy is kept
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Gemma3DecoderLayer}


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="FSDP/DeepSpeed fits need a CUDA GPU")
@pytest.mark.parametrize("trainer", ["fsdp", "deepspeed_z2", "deepspeed_z3"])
def test_sharded_fit_exports_a_consolidated_hf_model(tmp_path, trainer):
    import torch
    from transformers import AutoModelForCausalLM

    if trainer.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    out = tmp_path / trainer
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", *TINY,
           f"distill.cache_dir={tmp_path / 'cache'}", f"trainer={trainer}", "trainer.devices=1", "trainer.max_steps=2",
           "trainer.max_epochs=-1", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["fit/steps"] == 2 and m["status"] == "ok"
    assert m["model_dir"] == str(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert set(model.state_dict()) == set(fresh.state_dict())
    assert all(torch.isfinite(p).all() for p in model.parameters())
