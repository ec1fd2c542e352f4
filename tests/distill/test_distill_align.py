"""Token alignment, DTW, vocabulary mapping and distribution alignment against hand-made cases."""
from __future__ import annotations

import math

import numpy as np
import pytest

from fusionlab.align.mapping import build_vocab_map
from fusionlab.align.token_align import align_tokens, dtw_path
from fusionlab.align.vocab import strip_marker, token_surfaces
from fusionlab.distill.dist_align import align_distribution, build_fused_dataset, dedupe_topk
from fusionlab.errors import FusionlabError


def spans(tokens: list[str]) -> np.ndarray:
    out, pos = [], 0
    for t in tokens:
        out.append((pos, pos + len(t)))
        pos += len(t)
    return np.asarray(out)


def path_cost(cost, path):
    return sum(cost[i, j] for i, j in path)


def brute_force_min(cost) -> float:
    """Enumerate every monotone path (steps (1,0), (0,1), (1,1)) from (0,0) to the last cell."""
    n, m = cost.shape
    best = math.inf

    def walk(i, j, acc):
        nonlocal best
        acc += cost[i, j]
        if (i, j) == (n - 1, m - 1):
            best = min(best, acc)
            return
        for di, dj in ((1, 1), (1, 0), (0, 1)):
            if i + di < n and j + dj < m:
                walk(i + di, j + dj, acc)

    walk(0, 0, 0.0)
    return best


def valid_path(path, n, m):
    assert path[0] == (0, 0) and path[-1] == (n - 1, m - 1)
    for (a, b), (c, d) in zip(path, path[1:]):
        assert (c - a, d - b) in ((1, 0), (0, 1), (1, 1))


@pytest.mark.parametrize("seed", range(12))
def test_dtw_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n, m = rng.integers(1, 6, size=2)
    cost = rng.integers(0, 4, size=(n, m)).astype(float)  # small ints: many ties
    path = dtw_path(cost)
    valid_path(path, n, m)
    assert path_cost(cost, path) == pytest.approx(brute_force_min(cost))


def test_dtw_wavefront_equals_loop_optimum():
    rng = np.random.default_rng(0)
    cost = rng.random((23, 31))  # > 256 cells: the vectorised anti-diagonal DP
    D = np.full((24, 32), np.inf)
    D[0, 0] = 0
    for i in range(23):
        for j in range(31):
            D[i + 1, j + 1] = cost[i, j] + min(D[i, j + 1], D[i + 1, j], D[i, j])
    path = dtw_path(cost)
    valid_path(path, 23, 31)
    assert path_cost(cost, path) == pytest.approx(D[-1, -1])


def test_dtw_prefers_diagonal_on_ties():
    assert dtw_path(np.zeros((3, 3))) == [(0, 0), (1, 1), (2, 2)]


def test_same_tokenizer_aligns_to_identity(smol_tok):
    text = "<|im_start|>user\nHow are  you? café 日本語 — fine.<|im_end|>\n"
    enc = smol_tok(text, add_special_tokens=False, return_offsets_mapping=True)
    off = np.asarray(enc["offset_mapping"])
    surf = token_surfaces(smol_tok)
    strs = [strip_marker(surf[i]) for i in enc["input_ids"]]
    a = align_tokens(off, off, strs, strs)
    n = len(off)
    assert a.indptr.tolist() == list(range(n + 1))
    assert a.indices.tolist() == list(range(n))
    assert a.matched.tolist() == list(range(n))


def test_one_pivot_token_vs_several_source_tokens():
    piv, src = ["The", " hello", "!"], ["The", " hel", "lo", "!"]
    a = align_tokens(spans(piv), spans(src), piv, src)
    assert [a.aligned(i) for i in range(3)] == [[0], [1, 2], [3]]
    # " hello" ends where "lo" ends: its distribution is the source's at "lo"
    assert a.matched.tolist() == [0, 2, 3]
    assert a.exact.tolist() == [True, True, True]


def test_several_pivot_tokens_vs_one_source_token():
    piv, src = ["The", " hel", "lo", "!"], ["The", " hello", "!"]
    a = align_tokens(spans(piv), spans(src), piv, src)
    assert [a.aligned(i) for i in range(4)] == [[0], [1], [1], [2]]
    # " hel" has no source token ending with it (and is not 1-1): one-hot fallback; "lo" is exact
    assert a.matched.tolist() == [0, -1, 1, 2]


def test_crossing_boundaries_use_dtw_only_inside_the_segment():
    piv, src = ["a", "bc", "de", "f"], ["a", "bcd", "e", "f"]
    a = align_tokens(spans(piv), spans(src), piv, src)
    assert a.aligned(0) == [0] and a.aligned(3) == [3]
    assert a.exact.tolist() == [True, False, True, True]
    assert a.aligned(1) == [1] and a.aligned(2) == [2]  # "bc"~"bcd" (substring), "de"~"e"
    # a 1-1 DTW pair that ends at another character ("bc" | "d…" vs "bcd" | "e…") predicts other text:
    # one-hot fallback, never the source's distribution (it used to be taken: issue 12)
    assert a.matched[1] == -1 and a.matched[2] == 2
    strict = align_tokens(spans(piv), spans(src), piv, src, one_to_one=False)
    assert strict.matched.tolist() == a.matched.tolist()


def test_split_multibyte_character_is_not_an_anchor():
    # byte-level BPE splits one character into several tokens sharing one end offset
    piv_off = np.asarray([(0, 1), (1, 2), (1, 2), (2, 3)])
    src_off = np.asarray([(0, 1), (1, 2), (2, 3)])
    a = align_tokens(piv_off, src_off, ["a", "\xe6", "\x97", "b"], ["a", "日", "b"])
    assert a.exact.tolist() == [True, False, True, True]
    assert a.matched[2] == 1 and a.matched[0] == 0


def test_token_surfaces_agree_across_tokenizer_families(smol_tok, gemma_tok):
    ps, gs = token_surfaces(smol_tok), token_surfaces(gemma_tok)
    for text in [" hello", "\n", " the"]:
        p = smol_tok.convert_tokens_to_ids(text.replace(" ", "Ġ").replace("\n", "Ċ"))
        g = gemma_tok.convert_tokens_to_ids(text.replace(" ", "▁"))
        assert ps[p] == gs[g] == text
    em = build_vocab_map("em", range(2000, 2100), gs, ps)
    assert (em[2000:2100] >= 0).mean() > 0.3  # thousands of shared surfaces
    # one exact match for EVA and FuseChat: the EM map agrees with EVA's seed dictionary on every shared token
    from fusionlab.align import seed_dictionary

    pairs = seed_dictionary(gemma_tok, smol_tok).numpy()
    em = build_vocab_map("em", pairs[:, 0], gs, ps)
    assert len(pairs) > 40000 and (em[pairs[:, 0]] == pairs[:, 1]).all()


SRC = [" hello", "hellp", " worl", "xyz", "<s>"]
PIV = [" hello", "hel", "lo", " world", "</s>"]


def test_vocab_map_em():
    assert build_vocab_map("em", range(5), SRC, PIV).tolist() == [0, -1, -1, -1, -1]


def test_vocab_map_mined():
    m = build_vocab_map("mined", range(5), SRC, PIV).tolist()
    assert m[0] == 0 and m[1] == 0  # "hellp" -> "hello": distance 1
    assert m[2] == 3  # "worl" -> "world": distance 1
    assert m[4] == 4  # "<s>" -> "</s>": distance 1


def test_vocab_map_ms_uses_counts_substrings_and_sigmoid():
    counts = {(2, 3): 5, (2, 0): 1, (1, 1): 3, (1, 2): 3}
    m = build_vocab_map("ms", [1, 2, 3], SRC, PIV, counts=counts, fallback=None).tolist()
    # " worl": world: 1 * 0.1 * sigmoid(5) = 0.099 < hello: 4 * sigmoid(1) = 2.92
    assert m[2] == 3
    # "hellp": "hel" is a substring: 2 * 0.1 * sigmoid(3) = 0.19 < "lo": 4 * sigmoid(3)
    assert m[1] == 1
    assert m[3] == -1  # never co-aligned and no fallback
    with pytest.raises(FusionlabError, match="Unknown vocabulary mapping"):
        build_vocab_map("nope", [1], SRC, PIV)


def test_dedupe_keeps_higher_logit_and_drops_unmapped():
    ids, lg = dedupe_topk(np.array([[5, 7, 5, -1]]), np.array([[3.0, 2.0, 1.0, 0.5]]))
    assert ids.tolist() == [[5, 7, -1, -1]]
    assert lg[0, :2].tolist() == [3.0, 2.0] and np.isneginf(lg[0, 2:]).all()


def test_distribution_alignment_maps_and_falls_back_to_next_token():
    pivot_ids = np.array([10, 11, 12, 13])
    matched = np.array([0, -1, 2, 3])
    src_ids = np.array([[0, 1], [1, 2], [2, 0], [3, 3]])
    src_lg = np.array([[5.0, 4.0], [3.0, 2.0], [9.0, 8.0], [1.0, 0.0]], dtype=np.float32)
    vmap = np.array([20, 21, 20, -1])
    ids, lg, n1 = align_distribution(pivot_ids, matched, src_ids, src_lg, vmap, k=3)
    assert ids[0].tolist() == [20, 21, -1] and lg[0, :2].tolist() == [5.0, 4.0]
    assert ids[1].tolist() == [12, -1, -1]  # one-hot on the NEXT pivot token
    assert ids[2].tolist() == [20, -1, -1] and lg[2, 0] == 9.0  # duplicate 20 keeps the higher logit
    assert ids[3].tolist() == [-1, -1, -1]  # unmapped at the last position: nothing to predict
    assert n1 == 1


def _rep(ids, offsets, ce=1.0, k=2):
    n = len(ids)
    return {"input_ids": np.asarray(ids), "offsets": np.asarray(offsets), "assistant": np.ones(n, bool),
            "topk_ids": np.zeros((n, k), np.int32), "topk_logits": np.zeros((n, k), np.float32), "ce": ce}


def test_unalignable_source_is_a_clear_error():
    surf = [" a", "b", "c"]
    pivot = {"s": _rep([0, 1, 2], [(0, 2), (2, 3), (3, 4)])}
    broken = {"s": _rep([0, 1, 2], [(0, 1), (1, 1), (1, 1)])}  # offsets that cover nothing
    other = [" a", "b", "d"]  # another vocabulary: a same-vocabulary source with equal ids aligns by identity
    with pytest.raises(FusionlabError, match="cannot be aligned"):
        build_fused_dataset(pivot, [broken], surf, [other], names=["bad"])
    with pytest.raises(FusionlabError, match="No sample"):
        build_fused_dataset(pivot, [{}], surf, [surf])
