"""fusionlab's own cache entries are verified on read: size + content hash recorded at write; a truncated or
altered entry is detected (and, for the embedded models, converted again), an intact one is used as is."""
from __future__ import annotations

import logging

import pytest

from fusionlab.io import MANIFEST, atomic_dir, content_hash, manifest_problem, write_manifest


@pytest.fixture
def entry(tmp_path):
    """A real cache entry: a tiny random model saved as the embedded conversion saves it."""
    from fusionlab.models import build_random_model

    model = build_random_model({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "vocab_size": 64, "max_position_embeddings": 32}, seed=3)
    target = tmp_path / "models" / "tiny-v1"
    with atomic_dir(target, owned=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / "tokenizer_config.json").write_text("{}")
        write_manifest(tmp)
    return target


def test_intact_entry_verifies(entry):
    assert manifest_problem(entry) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_entry_is_detected(entry, damage):
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":  # a disk-full / killed copy
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, altered bytes
        weights.write_bytes(data[:-100] + bytes(b ^ 0xFF for b in data[-100:]))
    else:
        weights.unlink()
    problem = manifest_problem(entry)
    assert problem and "model.safetensors" in problem


def test_content_hash_sees_every_region(tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(5 * 2**20))
    before = content_hash(big)
    with open(big, "r+b") as f:
        f.seek(3 * 2**20)  # a region the sampled blocks cover (16 evenly spaced 64 KiB blocks)
        f.write(b"\x01" * 2**16)
    assert content_hash(big) != before


def test_embedded_cache_problem_adopts_old_entries_and_refuses_broken_ones(entry, caplog):
    from fusionlab.models.embedded import _cache_problem

    (entry / MANIFEST).unlink()  # an entry written before manifests: whole, so adopted
    assert _cache_problem(entry) is None and (entry / MANIFEST).is_file()
    (entry / MANIFEST).unlink()
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # no manifest and truncated: not adopted
    assert "truncated" in _cache_problem(entry)


@pytest.mark.slow
def test_truncated_embedded_model_is_rebuilt_equal(tmp_path, monkeypatch, caplog):
    """The real SmolLM2 cache entry truncated: the next load warns once, converts again, and equals the original."""
    import shutil

    from fusionlab.models import cache_dir, embedded_checkpoint

    original = embedded_checkpoint("smollm2_135m")  # the shared cache (converted once)
    monkeypatch.setenv("FUSIONLAB_CACHE", str(tmp_path))
    copy = cache_dir() / "models" / original.name
    shutil.copytree(original, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    with caplog.at_level(logging.WARNING):
        rebuilt = embedded_checkpoint("smollm2_135m")
    assert sum("converting it again" in r.message for r in caplog.records) == 1
    assert manifest_problem(rebuilt) is None
    assert content_hash(rebuilt / "model.safetensors") == content_hash(original / "model.safetensors")


def _damage_weights(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def test_a_damaged_derived_fine_tune_is_trained_again_to_the_same_weights(tmp_path, caplog):
    """The merge experiments' derived checkpoints were reused whenever config.json existed: a truncated
    model.safetensors was a load error on every later run, never rebuilt."""
    from fusionlab.merge.derive import finetune
    from tests.conftest import TINY_DIMS
    from fusionlab.models import load_model

    model, tok = load_model({"name": "tiny", "source": "random", "tokenizer": "smollm2_135m",
                             "config": {"model_type": "llama", **TINY_DIMS}})
    base = tmp_path / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    settings = dict(steps=2, lr=1e-3, batch_size=2, max_length=16, seed=0)
    out = finetune(base, ["one text to learn", "and a second one"], tmp_path / "ft", **settings)
    first = content_hash(out / "model.safetensors")
    assert manifest_problem(out) is None
    _damage_weights(out)
    with caplog.at_level(logging.WARNING):
        again = finetune(base, ["one text to learn", "and a second one"], tmp_path / "ft", **settings)
    assert sum("cached fine-tune" in r.message and "building it again" in r.message for r in caplog.records) == 1
    assert again == out and content_hash(out / "model.safetensors") == first


def test_a_damaged_merged_lora_is_merged_again(tmp_path, monkeypatch, caplog):
    """resolve_lora's cache (base + adapter, merged by peft) was reused whenever config.json existed."""
    import torch

    from fusionlab.merge.lora import extract_lora, resolve_lora
    from tests.merge.conftest import TINY, tiny_state, write_model

    monkeypatch.setenv("FUSIONLAB_CACHE", str(tmp_path / "cache"))
    base_sd = tiny_state(0, TINY)
    g = torch.Generator().manual_seed(5)
    base = write_model(tmp_path / "base", base_sd, TINY)
    ft = write_model(tmp_path / "ft", {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base_sd.items()}, TINY)
    extract_lora(base, ft, tmp_path / "lora", rank=4)
    merged = resolve_lora(tmp_path / "lora")
    first = content_hash(merged / "model.safetensors")
    _damage_weights(merged)
    with caplog.at_level(logging.WARNING):
        assert resolve_lora(tmp_path / "lora") == merged
    assert sum("cached merged LoRA" in r.message for r in caplog.records) == 1
    assert manifest_problem(merged) is None and content_hash(merged / "model.safetensors") == first
