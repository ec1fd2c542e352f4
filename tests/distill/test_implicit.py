"""Implicit fusion (FuseChat-3.0): DPO / WRPO losses vs hand computation, response selection, the fit and the job."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from fusionlab.distill.implicit import ImplicitConfig, clm_record, select
from fusionlab.distill.preference import (PreferenceDataModule, PreferenceModule, collate_pairs, dpo_loss,
                                          response_logps, wrpo_alpha, wrpo_loss)
from fusionlab.errors import FusionlabError

t = torch.tensor


def nll_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def test_dpo_loss_equals_hand_computation():
    # r_w = (-3) - (-4) = 1, r_l = (-5) - (-4.5) = -0.5, beta 0.1 -> margin 0.15
    loss, margin = dpo_loss(t([-3.0]), t([-5.0]), t([-4.0]), t([-4.5]), beta=0.1)
    assert margin.item() == pytest.approx(0.15)
    assert loss.item() == pytest.approx(nll_sigmoid(0.15), abs=1e-7)
    # two pairs: the mean of the per-pair losses
    loss2, _ = dpo_loss(t([-3.0, -1.0]), t([-5.0, -1.0]), t([-4.0, -2.0]), t([-4.5, -0.5]), beta=0.1)
    assert loss2.item() == pytest.approx((nll_sigmoid(0.15) + nll_sigmoid(0.1 * (1.0 + 0.5))) / 2, abs=1e-7)


def test_wrpo_loss_equals_the_reference_value_and_alpha_zero_is_dpo():
    # SUCCESSORS.md: r_s = 1, r_t = 0.5, r_l = -0.5, alpha 0.1, beta 0.01 -> margin 0.0105, loss 0.687911
    zero = t([0.0])
    loss, margin = wrpo_loss(t([1.0]), t([0.5]), t([-0.5]), zero, zero, zero, beta=0.01, alpha=0.1)
    assert margin.item() == pytest.approx(0.0105)
    assert loss.item() == pytest.approx(0.687911, abs=1e-6)
    w0, _ = wrpo_loss(t([7.0]), t([-2.0]), t([-3.5]), t([1.0]), t([-2.5]), t([-3.0]), beta=0.3, alpha=0.0)
    d, _ = dpo_loss(t([-2.0]), t([-3.5]), t([-2.5]), t([-3.0]), beta=0.3)
    assert w0.item() == d.item()


def test_alpha_schedule_runs_linearly_from_zero_to_alpha():
    assert wrpo_alpha(0, 10, 0.1) == 0.0
    assert wrpo_alpha(9, 10, 0.1) == pytest.approx(0.1)
    assert wrpo_alpha(3, 7, 0.3) == pytest.approx(0.15)
    assert wrpo_alpha(0, 10, 0.1, "constant") == 0.1


def test_response_logps_sums_response_tokens_only():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = t([[-100, -100, 3, 1]])  # tokens 2 and 3 are the response
    logp = torch.log_softmax(logits, -1)
    hand = float(logp[0, 1, 3] + logp[0, 2, 1])
    assert response_logps(logits, labels).item() == pytest.approx(hand, abs=1e-6)
    assert response_logps(logits, labels, length_normalized=True).item() == pytest.approx(hand / 2, abs=1e-6)
    changed = logits.clone()
    changed[0, 0] += 5.0  # the logits that predict a prompt token
    assert response_logps(changed, labels).item() == pytest.approx(hand, abs=1e-6)


def test_select_picks_the_hand_computed_best_and_worst():
    scores = {"pivot": [-2.0, -1.5], "gemma": [-0.5, -3.0], "smol": [-1.0, -0.5]}
    dpo = select(scores, "pivot", "dpo")
    assert dpo == {"best": ("gemma", 0), "chosen": ("gemma", 0), "rejected": ("gemma", 1)}
    w = select(scores, "pivot", "wrpo")
    assert w == {"best": ("gemma", 0), "source": ("gemma", 0), "chosen": ("pivot", 1), "rejected": ("pivot", 0)}
    assert select({"pivot": [1.0, 1.0], "gemma": [1.0]}, "pivot", "dpo") == {"best": ("pivot", 0)}  # no pair
    # correctness: the chosen must be right and the rejected wrong
    assert select({"pivot": [0.0, 0.0], "gemma": [1.0, 0.0]}, "pivot", "dpo", correctness=True)["rejected"] == \
        ("pivot", 0)
    assert "chosen" not in select({"pivot": [1.0], "gemma": [1.0]}, "pivot", "dpo", correctness=True)
    assert select({"pivot": [-math.inf]}, "pivot") is None


def test_bad_implicit_settings_are_named():
    for kw, named in [({"loss": "ipo"}, "loss"), ({"beta": 0.0}, "beta"), ({"alpha": 1.5}, "alpha"),
                      ({"sft_fraction": 1.0}, "sft_fraction"), ({"scorer": "correct"}, "scorer=correct"),
                      ({"task": "nope"}, "nope"), ({"samples": 0}, "samples")]:
        with pytest.raises(FusionlabError, match=named):
            ImplicitConfig(**kw)


def _pair(prompt, good, bad):
    import numpy as np

    def seq(resp):
        ids = np.asarray(prompt + resp, dtype=np.int64)
        return {"input_ids": ids, "assistant": np.asarray([False] * len(prompt) + [True] * len(resp))}
    return {"id": "p", "chosen": seq(good), "rejected": seq(bad)}


def test_dpo_fit_raises_the_margin_and_leaves_the_reference_frozen(tmp_path, tiny_pair):
    import copy

    import lightning as L

    model = copy.deepcopy(tiny_pair[0][0]).train()
    reference = copy.deepcopy(model)
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    pairs = [_pair([5, 6, 7], [10, 11, 12], [20, 21, 22]), _pair([8, 9], [13, 14], [23, 24])]
    module = PreferenceModule(model, reference, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2), beta=0.5)
    batch = collate_pairs(pairs)
    assert batch["input_ids"].shape == (4, 6) and int(batch["n_roles"]) == 2
    assert module.preference_loss(batch)["loss"].item() == pytest.approx(math.log(2), abs=1e-6)  # policy = reference
    trainer = L.Trainer(accelerator="cpu", max_steps=6, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=PreferenceDataModule(pairs, batch_size=2))
    out = module.preference_loss(batch)
    assert out["loss"].item() < 0.5 and out["accuracy"].item() == 1.0
    assert all(torch.equal(ref_before[k], v) for k, v in reference.state_dict().items())
    assert not any(k.startswith("_reference") for k in module.state_dict())


def test_clm_record_makes_the_fusion_term_equal_the_clm_term():
    import numpy as np

    from fusionlab.distill.data import collate
    from fusionlab.distill.loss import fusion_loss

    rec = clm_record("a", {"input_ids": np.asarray([3, 4, 5, 6]), "assistant": np.asarray([False, True, True, True])})
    b = collate([rec])
    torch.manual_seed(0)
    out = fusion_loss(torch.randn(1, 4, 9), b["labels"], b["target_ids"], b["target_logits"], b["ce"], lam=0.5)
    assert out["fusion"].item() == pytest.approx(out["clm"].item(), abs=1e-6)


def test_unknown_mode_fails_at_compose_time(compose):
    from fusionlab.schema import validate

    with pytest.raises(FusionlabError, match="distill.mode 'blend'"):
        validate(compose(["+experiment=fusechat_pairwise", "distill.mode=blend"]))


def test_implicit_job_end_to_end_on_tiny_models(compose, tmp_path):
    from fusionlab.run import run

    cfg = compose(["+experiment=fusechat3_implicit", "model=tiny_llama", "model@distill.sources.gemma3_270m=tiny_gemma",
                   "logger=csv", "distill.data.limit=8", "distill.baseline=clm", "distill.data.max_length=256",
                   "distill.data.heldout=2", "distill.implicit.max_new_tokens=6", "distill.implicit.loss=wrpo",
                   "trainer.max_steps=2", "distill.implicit.preference_steps=2",
                   "trainer.enable_progress_bar=false"], tmp_path / "run")
    metrics = run(cfg)
    assert metrics["implicit/train_prompts"] == 8 and metrics["heldout/conversations"] == 2
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["heldout"]) == 2 and not set(split["train"]) & set(split["heldout"])
    assert metrics["sft/fit/steps"] == 2 and metrics["preference/steps"] == 2
    for name in ("pivot", "sft", "fused"):
        assert math.isfinite(metrics[f"heldout/ce/{name}"])
    assert metrics["heldout/ce_diff/fused_minus_pivot_low"] <= metrics["heldout/ce_diff/fused_minus_pivot"] <= \
        metrics["heldout/ce_diff/fused_minus_pivot_high"]
    assert metrics["heldout/ce_diff/fused_minus_sft"] == pytest.approx(
        metrics["heldout/ce/fused"] - metrics["heldout/ce/sft"], abs=1e-9)
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert metrics["baseline/fit/steps"] == 4  # the CLM twin trains as many steps as SFT + preference
    assert math.isfinite(metrics["heldout/ce_diff/fused_minus_clm"])
