"""LoRA extraction (fusionlab.merge.lora): truncated SVD per linear layer, peft format, errors per layer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge.lora import extract_lora, lora_targets, resolve_lora
from fusionlab.merge.io import CheckpointReader
from tests.merge.conftest import TINY, load_dir, tiny_state, write_model

FULL = {**TINY, "num_key_value_heads": TINY["num_attention_heads"]}  # every linear layer has rank 16 = hidden


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = tiny_state(0, FULL)
    g = torch.Generator().manual_seed(5)
    ft = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    return write_model(root / "base", base, FULL), write_model(root / "ft", ft, FULL)


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def test_full_rank_lora_loads_with_peft_and_reconstructs_the_delta(tmp_path, models):
    from peft import PeftModel

    base, ft = models
    out = tmp_path / "lora"
    info = extract_lora(base, ft, out, rank=FULL["hidden_size"])
    assert info["lora_layers"] == 7 * FULL["num_hidden_layers"] and info["lora_err_max"] < 1e-6
    merged = PeftModel.from_pretrained(_hf(base), str(out)).merge_and_unload().state_dict()
    want, orig = load_dir(ft), load_dir(base)
    targets = set(lora_targets(CheckpointReader(ft)))
    for name, t in merged.items():
        ref = want[name] if name in targets else orig[name]  # a LoRA leaves norms and embeddings alone
        assert torch.allclose(t, ref, atol=2e-6, rtol=0), name
    # what the LoRA cannot hold: the embeddings', lm_head's and norms' share of the whole fine-tune delta
    tau = {n: (want[n] - orig[n]).double() for n in want}
    rest = sum(float(d.pow(2).sum()) for n, d in tau.items() if n not in targets)
    assert info["lora_uncaptured_rel"] == pytest.approx((rest / sum(float(d.pow(2).sum()) for d in tau.values())) ** 0.5)


def test_rank_r_error_is_the_tail_of_the_singular_values(tmp_path, models):
    base, ft = models
    r = 3
    out = tmp_path / "lora3"
    info = extract_lora(base, ft, out, rank=r, modules=["q_proj", "down_proj"])
    adapter, want, orig = load_dir(out), load_dir(ft), load_dir(base)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == r == cfg["lora_alpha"] and cfg["target_modules"] == ["down_proj", "q_proj"]
    assert info["lora_layers"] == 2 * FULL["num_hidden_layers"]
    for layer in range(FULL["num_hidden_layers"]):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{mod}"
            delta = (want[name + ".weight"] - orig[name + ".weight"]).double().numpy()
            s = np.linalg.svd(delta, compute_uv=False)
            tail = np.sqrt((s[r:] ** 2).sum() / (s ** 2).sum())
            assert info[f"lora_err/{name}"] == pytest.approx(tail, rel=1e-9)
            a = adapter[f"base_model.model.{name}.lora_A.weight"].double().numpy()
            b = adapter[f"base_model.model.{name}.lora_B.weight"].double().numpy()
            assert a.shape == (r, delta.shape[1]) and b.shape == (delta.shape[0], r)
            assert np.linalg.norm(delta - b @ a) / np.linalg.norm(delta) == pytest.approx(tail, rel=1e-5)


def test_bad_rank_fails_before_anything_is_read_or_written(tmp_path, models):
    base, ft = models
    for rank, match in ((0, "integer >= 1"), (-2, "integer >= 1"), (17, "above the rank of 21 layer")):
        with pytest.raises(FusionlabError, match=match):
            extract_lora(base, ft, tmp_path / "bad", rank=rank)
    with pytest.raises(FusionlabError, match="No linear layer"):
        extract_lora(base, ft, tmp_path / "bad", rank=2, modules=["no_such_proj"])
    assert not (tmp_path / "bad").exists()


def test_a_lora_is_a_chat_vector_source(tmp_path, models, monkeypatch):
    """chat_vector with chat = a LoRA dir: τ is the adapter's B·A (base + LoRA merged by peft, cached)."""
    from fusionlab.merge.chat_vector import ChatVectorConfig, transfer

    monkeypatch.setenv("FUSIONLAB_CACHE", str(tmp_path / "cache"))
    base, ft = models
    lora = tmp_path / "lora"
    extract_lora(base, ft, lora, rank=FULL["hidden_size"])
    assert resolve_lora(base) == base and resolve_lora(lora).parent == tmp_path / "cache" / "lora_merged"
    cp = write_model(tmp_path / "cp", tiny_state(7, FULL), FULL)
    cv = ChatVectorConfig(base=str(base), chat=str(lora), cp=str(cp), progress=False).for_run(tmp_path / "run")
    transfer(cv)
    merged, want, orig, cp_sd = load_dir(cv.output), load_dir(ft), load_dir(base), load_dir(cp)
    targets = set(lora_targets(CheckpointReader(ft)))
    for name, t in merged.items():
        tau = want[name] - orig[name] if name in targets else torch.zeros_like(t)
        assert torch.allclose(t, cp_sd[name] + tau, atol=5e-6), name
