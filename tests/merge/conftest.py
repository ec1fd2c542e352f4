"""Tiny random Llama checkpoints on disk for merge tests (built once per session, < 1 s)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionlab.merge.io import save_state_dict

TINY = dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, tie_word_embeddings=False)


def tiny_state(seed: int, cfg: dict = TINY) -> dict[str, torch.Tensor]:
    """A Llama-shaped state dict (names and shapes as HF writes them), random values."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    sd = {"model.embed_tokens.weight": torch.randn(v, h, generator=g)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        sd.update({
            p + "input_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
            p + "self_attn.q_proj.weight": torch.randn(h, h, generator=g),
            p + "self_attn.k_proj.weight": torch.randn(kv, h, generator=g),
            p + "self_attn.v_proj.weight": torch.randn(kv, h, generator=g),
            p + "self_attn.o_proj.weight": torch.randn(h, h, generator=g),
            p + "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(h, generator=g),
            p + "mlp.gate_proj.weight": torch.randn(i, h, generator=g),
            p + "mlp.up_proj.weight": torch.randn(i, h, generator=g),
            p + "mlp.down_proj.weight": torch.randn(h, i, generator=g),
        })
    sd["model.norm.weight"] = 1 + 0.1 * torch.randn(h, generator=g)
    if not cfg.get("tie_word_embeddings"):
        sd["lm_head.weight"] = torch.randn(v, h, generator=g)
    return sd


def llama_config(cfg: dict = TINY) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32",
            "rms_norm_eps": 1e-6, "max_position_embeddings": 64, **cfg}


def write_model(path: Path, sd: dict[str, torch.Tensor], cfg: dict = TINY, shard_bytes: int = 10**9) -> Path:
    save_state_dict(sd, path, llama_config(cfg), max_shard_bytes=shard_bytes)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return path


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """base + three fine-tune-like variants (base + 0.1·noise) + one bf16 copy of a variant."""
    root = tmp_path_factory.mktemp("merge_models")
    base = tiny_state(0)
    out = {"base": write_model(root / "base", base)}
    for k in range(3):
        g = torch.Generator().manual_seed(100 + k)
        sd = {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        out[f"m{k}"] = write_model(root / f"m{k}", sd)
    return out


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    from fusionlab.merge.io import CheckpointReader

    r = CheckpointReader(path)
    return {n: r.get(n, dtype=None) for n in r.names}
