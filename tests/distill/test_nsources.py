"""FuseLLM with N sources: three sources fused, MinCE / AvgCE over all of them, same-vocabulary sources by identity."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusionlab.distill.data import collate
from fusionlab.distill.dist_align import build_fused_dataset, identity_alignment
from fusionlab.distill.loss import fusion_loss
from fusionlab.errors import FusionlabError

PIV = [" a", "b", "c", "bc", "d"]  # the pivot's vocabulary (token surfaces)
OTHER = [" a", "bc", "x", "d"]  # a different vocabulary: needs token + vocabulary alignment
SPANS = {"piv": ([0, 1, 2, 4], [(0, 2), (2, 3), (3, 4), (4, 5)]),  # " a|b|c|d"
         "merged": ([0, 3, 4], [(0, 2), (2, 4), (4, 5)]),  # " a|bc|d" in the pivot's vocabulary
         "other": ([0, 1, 3], [(0, 2), (2, 4), (4, 5)])}  # " a|bc|d" in OTHER
CE = {"s0": [2.0, 1.5, 0.7, 1.0], "s1": [1.0, 3.0, 2.0, 0.2], "s2": [0.1, 0.5, 0.9, 0.3]}  # pivot, src1..3
BEST = {"s0": 2, "s1": 3, "s2": 0}  # argmin per sample, by hand


def rep(kind, ce, vocab, seed, k=3):
    ids, off = SPANS[kind]
    rng = np.random.default_rng(seed)
    topk = np.stack([rng.permutation(vocab)[:k] for _ in ids]).astype(np.int32)
    return {"input_ids": np.asarray(ids), "offsets": np.asarray(off), "assistant": np.ones(len(ids), bool),
            "topk_ids": topk, "topk_logits": rng.normal(size=(len(ids), k)).astype(np.float32), "ce": ce}


@pytest.fixture(scope="module")
def fused():
    pivot = {s: rep("piv", c[0], len(PIV), 0) for s, c in CE.items()}
    same = {s: rep("piv", c[1], len(PIV), 1) for s, c in CE.items()}  # same vocabulary, same tokenisation
    other = {s: rep("other", c[2], len(OTHER), 2) for s, c in CE.items()}
    merged = {s: rep("merged", c[3], len(PIV), 3) for s, c in CE.items()}  # same vocabulary, other tokenisation
    records, stats = build_fused_dataset(pivot, [same, other, merged], PIV, [PIV, OTHER, PIV], k=3,
                                         min_exact_rate=0.0, names=["same", "other", "merged"])
    return pivot, same, records, stats


def test_three_sources_give_four_candidates_per_sample(fused):
    _, _, records, stats = fused
    assert [r["id"] for r in records] == list(CE)
    for r in records:
        assert r["target_ids"].shape == (4, 4, 3) and r["ce"].tolist() == pytest.approx(CE[r["id"]])
    assert stats["same/same_vocab"] and stats["merged/same_vocab"] and not stats["other/same_vocab"]
    assert stats["same/identity_rate"] == 1.0 and stats["merged/identity_rate"] == 0.0


def test_same_vocabulary_source_skips_vocabulary_alignment(fused):
    _, same, records, stats = fused
    assert stats["same/vocab_coverage"] == 1.0
    for r in records:  # the source's own top-k, position by position: the exact identity map
        assert r["target_ids"][1].tolist() == same[r["id"]]["topk_ids"].tolist()
        assert r["target_logits"][1].tolist() == same[r["id"]]["topk_logits"].tolist()


def test_identity_alignment_allows_only_a_leading_bos():
    a = identity_alignment(np.array([5, 6, 7]), np.array([1, 5, 6, 7]))
    assert a.matched.tolist() == [1, 2, 3] and a.exact.all()
    assert identity_alignment(np.array([5, 6, 7]), np.array([5, 6, 8])) is None
    assert identity_alignment(np.array([5, 6, 7]), np.array([5, 6])) is None


def hand_fusion(records, logits, weights):
    """Σ over samples and positions of −Σ_m w_m Σ_v P_m(v) log softmax(z)(v), / number of positions."""
    total, n = 0.0, 0
    for b, r in enumerate(records):
        for t in range(len(r["input_ids"]) - 1):
            lp = torch.log_softmax(logits[b, t].double(), -1)
            n += 1
            for m, w in enumerate(weights[b]):
                valid = r["target_ids"][m, t] >= 0
                p = torch.softmax(torch.as_tensor(r["target_logits"][m, t][valid], dtype=torch.float64), -1)
                total += w * -float((p * lp[torch.as_tensor(r["target_ids"][m, t][valid])]).sum())
    return total / n


def test_min_ce_picks_the_hand_computed_source_per_sample(fused):
    _, _, records, _ = fused
    batch = collate(records)
    assert batch["ce"].argmin(-1).tolist() == [BEST[r["id"]] for r in records]
    torch.manual_seed(0)
    logits = torch.randn(3, 4, len(PIV))
    out = fusion_loss(logits, batch["labels"], batch["target_ids"], batch["target_logits"], batch["ce"],
                      lam=0.0, mode="min_ce")
    one_hot = [[1.0 if m == BEST[r["id"]] else 0.0 for m in range(4)] for r in records]
    assert out["fusion"].item() == pytest.approx(hand_fusion(records, logits, one_hot), rel=1e-5)
    # the wrong pick gives another number: the test can fail
    wrong = [[1.0 if m == (BEST[r["id"]] + 1) % 4 else 0.0 for m in range(4)] for r in records]
    assert out["fusion"].item() != pytest.approx(hand_fusion(records, logits, wrong), rel=1e-3)


def test_avg_ce_weights_all_four_candidates(fused):
    _, _, records, _ = fused
    batch = collate(records)
    torch.manual_seed(1)
    logits = torch.randn(3, 4, len(PIV))
    out = fusion_loss(logits, batch["labels"], batch["target_ids"], batch["target_logits"], batch["ce"],
                      lam=0.0, mode="avg_ce")
    weights = []
    for r in records:
        e = [math.exp(-c) for c in CE[r["id"]]]
        weights.append([x / sum(e) for x in e])
    assert out["fusion"].item() == pytest.approx(hand_fusion(records, logits, weights), rel=1e-5)


def test_three_tiny_sources_through_the_pipeline(tmp_path):
    from fusionlab.distill.config import DataConfig, DistillConfig
    from fusionlab.distill.pipeline import prepare
    from fusionlab.models import ModelSpec

    tiny = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    llama = dict(source="random", tokenizer="smollm2_135m", config=tiny)  # (another vocabulary: the tests above)
    dc = DistillConfig(pivot=ModelSpec(name="p", **llama),
                       sources={"variant": ModelSpec(name="v", seed=1, **llama),
                                "wide": ModelSpec(name="w", seed=3, **{**llama, "config": {**tiny, "hidden_size": 64}}),
                                "variant2": ModelSpec(name="v2", seed=2, **llama)},
                       data=DataConfig(limit=3, heldout=2, max_length=128), cache_dir=str(tmp_path / "cache"))
    data = prepare(dc)
    assert data.source_names == ["variant", "wide", "variant2"]
    assert len(data.records) == 3 and all(r["target_ids"].shape[0] == 4 for r in data.records)
    m = data.metrics
    for name in data.source_names:
        assert m[f"align/{name}/same_vocab"] and m[f"align/{name}/identity_rate"] == 1.0
        assert m[f"align/{name}/onehot_rate"] == 0.0  # every position keeps the source's own distribution
    assert not np.array_equal(data.records[0]["target_logits"][1], data.records[0]["target_logits"][3])


def test_a_derived_source_must_be_defined():
    from fusionlab.distill.config import DistillConfig
    from fusionlab.models import ModelSpec

    with pytest.raises(FusionlabError, match="derived:nope"):
        DistillConfig(pivot=ModelSpec(name="p", source="embedded", path="smollm2_135m"),
                      sources={"x": ModelSpec(name="x", source="hf", path="derived:nope")})
