"""Lightning fits on a tiny random model: resume = uninterrupted, bad checkpoints, LoRA, configs."""
from __future__ import annotations

import functools

import lightning as L
import numpy as np
import pytest
import torch

from fusionlab.distill.data import FuseDataModule, collate
from fusionlab.distill.module import FuseLightningModule, warmup_cosine
from fusionlab.errors import FusionlabError
from fusionlab.models import build_random_model

V = 64
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1}


def records(n=8, L_=12, M=2, k=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        ln = int(rng.integers(6, L_))
        assistant = np.zeros(ln, bool)
        assistant[ln // 2:] = True
        out.append({"id": str(i), "input_ids": rng.integers(0, V, ln), "assistant": assistant,
                    "target_ids": rng.integers(-1, V, (M, ln, k)), "target_logits": rng.normal(size=(M, ln, k)).astype(np.float32),
                    "ce": rng.random(M).astype(np.float32)})
    return out


class LossLog(L.Callback):
    def __init__(self):
        self.losses = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = float(outputs["loss"])


def make(hidden=32, **kw):
    model = build_random_model({**TINY, "hidden_size": hidden}, seed=0, vocab_size=V)
    return FuseLightningModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                               scheduler=functools.partial(warmup_cosine, warmup_ratio=0.25), **kw)


class Interrupt(L.Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:  # after step `at` and its checkpoint
            raise RuntimeError("simulated crash")


def fit(tmp, max_steps, ckpt=None, module=None, every=None, crash_at=None):
    log = LossLog()
    cbs = [log]
    if every:
        cbs.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp / "ckpt", every_n_train_steps=every, save_last=True,
                                                       save_top_k=-1))
    if crash_at:
        cbs.append(Interrupt(crash_at))
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=cbs, default_root_dir=tmp, enable_checkpointing=bool(every))
    module = module or make()
    trainer.fit(module, datamodule=FuseDataModule(records(), batch_size=2, seed=3), ckpt_path=ckpt)
    return log.losses, module


def test_collate_masks_instruction_and_padding():
    b = collate(records(2))
    lab, att = b["labels"], b["attention_mask"]
    assert ((lab != -100) <= (att == 1)).all()
    r = records(2)[0]
    n = len(r["input_ids"])
    assert (lab[0, :n // 2] == -100).all() and (lab[0, n // 2:n] == torch.as_tensor(r["input_ids"][n // 2:])).all()
    assert (b["target_ids"][0, :, n:] == -1).all()


def test_resumed_run_continues_with_the_same_losses(tmp_path):
    full, m_full = fit(tmp_path / "a", max_steps=7)  # 4 steps per epoch: crosses an epoch boundary
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", max_steps=7, every=3, crash_at=3)
    first = {1: full[1], 2: full[2], 3: full[3]}  # identical by construction until the crash
    resumed, m_res = fit(tmp_path / "b", max_steps=7, every=3, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert sorted(resumed) == [4, 5, 6, 7]
    for step in range(1, 8):
        got = first.get(step, resumed.get(step))
        assert got == pytest.approx(full[step], rel=1e-5, abs=1e-6), step
    for p, q in zip(m_full.parameters(), m_res.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_resume_from_an_epoch_boundary_continues_with_the_same_losses(tmp_path):
    """A checkpoint written at the last batch of an epoch (4 steps of 2 of the 8 records) used to resume one
    epoch too far (its sample count was applied to the next epoch, which then came out empty)."""
    full, m_full = fit(tmp_path / "a", max_steps=6)
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", max_steps=6, every=4, crash_at=4)
    resumed, m_res = fit(tmp_path / "b", max_steps=6, every=4, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert sorted(resumed) == [5, 6]
    assert [resumed[5], resumed[6]] == pytest.approx([full[5], full[6]], rel=1e-5, abs=1e-6)
    for p, q in zip(m_full.parameters(), m_res.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_throughput_after_a_resume_counts_only_this_process(tmp_path):
    """A resumed run restores the run's token total but times only its own steps (issue 16: 9.67e11 tok/s)."""
    _, m_full = fit(tmp_path / "a", max_steps=6)
    crashed = make()
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path / "b", max_steps=6, every=3, crash_at=3, module=crashed)
    _, m_res = fit(tmp_path / "b", max_steps=6, every=3, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert (crashed.steps_this_run, m_res.steps_this_run, m_full.steps_this_run) == (3, 3, 6)
    assert m_res.tokens_seen == m_full.tokens_seen  # the run's total: same batches in the same order
    assert m_res.tokens_this_run == m_full.tokens_seen - crashed.tokens_this_run
    # throughput is this process's tokens over this process's step time (no timing comparison: the cores are shared)
    assert m_res.step_seconds > 0
    assert m_res.tokens_per_s == pytest.approx(m_res.tokens_this_run / m_res.step_seconds)
    _, m_none = fit(tmp_path / "b", max_steps=6, every=3, ckpt=str(tmp_path / "b" / "ckpt" / "last.ckpt"))
    assert m_none.steps_this_run == 0 and m_none.tokens_seen == m_full.tokens_seen
    assert m_none.tokens_per_s == 0.0  # no step ran here: no throughput, never restored tokens / ~0 s


def test_resume_from_mismatched_checkpoint_is_a_clear_error(tmp_path):
    fit(tmp_path / "a", max_steps=1, every=1)
    with pytest.raises(FusionlabError, match="different model"):
        fit(tmp_path / "b", max_steps=2, ckpt=str(tmp_path / "a" / "ckpt" / "last.ckpt"), module=make(hidden=16))


def test_empty_dataset_and_bad_options_are_errors():
    with pytest.raises(FusionlabError, match="empty"):
        FuseDataModule([])
    with pytest.raises(FusionlabError, match="fusion_mode"):
        make(fusion_mode="maximum")
    with pytest.raises(FusionlabError, match="lam"):
        make(lam=1.5)


def test_lora_with_gradient_checkpointing_trains_only_adapters(tmp_path):
    module = make(lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, gradient_checkpointing=True)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    losses, module = fit(tmp_path, max_steps=2, module=module)
    changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed) and all(np.isfinite(list(losses.values())))
