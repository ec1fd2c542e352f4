"""fill=omp (mergekit's tokensurgeon OMP over shared anchor tokens): the solver against hand-computed and exact
references and mergekit's own ``batch_omp``; a transplant whose donor shares the model's embedding space gets the
donor's rows back; exact tokens keep their rows; bad k fails with a FusionlabError."""
from __future__ import annotations

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge.tokenizer import TokenizerConfig, TokenSurgeonConfig, omp, transplant
from tests.merge.conftest import load_dir
from tests.merge.test_tokenizer_merge import EXTRA, pair  # noqa: F401  (the module fixture)


def test_two_anchor_case_by_hand():
    # y = (3, 1); a0 = (1, 0), a1 = (1, 1): <y,a0> = 3 < <y,a1> = 4, so a1 first; then y = 2·a0 + 1·a1 exactly.
    atoms, y = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 1.0]])
    ids, coef = omp(y, atoms, k=2)
    assert ids.tolist() == [[1, 0]] and torch.allclose(coef, torch.tensor([[1.0, 2.0]]))
    ids, coef = omp(y, atoms, k=1)  # one atom: the projection of y on a1, <y,a1>/|a1|² = 2
    assert ids.tolist() == [[1]] and torch.allclose(coef, torch.tensor([[2.0]]))


def test_sparse_target_is_recovered_exactly_and_duplicates_get_zero():
    g = torch.Generator().manual_seed(0)
    atoms = torch.randn(20, 256, generator=g)
    atoms = torch.cat([atoms, atoms[:3]])  # rows 20-22 duplicate rows 0-2: dependent atoms
    y = torch.stack([2 * atoms[1] - 0.5 * atoms[7], 1.5 * atoms[4] + atoms[12] - atoms[19]])
    ids, coef = omp(y, atoms, k=5, candidates=len(atoms))
    rebuilt = torch.einsum("nk,nkd->nd", coef, atoms[ids])
    assert torch.allclose(rebuilt, y, atol=1e-4)
    weights = [{(i % 20): round(c, 4) for i, c in zip(r.tolist(), w.tolist()) if abs(c) > 1e-4} for r, w in zip(ids, coef)]
    assert weights == [{1: 2.0, 7: -0.5}, {4: 1.5, 12: 1.0, 19: -1.0}]


def test_exact_pool_is_mergekits_batch_omp():
    mk = pytest.importorskip("mergekit.tokensurgeon")
    g = torch.Generator().manual_seed(1)
    atoms, y = torch.randn(300, 32, generator=g), torch.randn(40, 32, generator=g)
    for k in (1, 6, 20):
        ids, coef = omp(y, atoms, k=k, candidates=300, block=16)
        ref_ids, ref_coef = mk.batch_omp(y, atoms, k)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(coef, ref_coef, atol=1e-4)


def test_omp_bad_k_and_pool():
    atoms = torch.randn(5, 3)
    with pytest.raises(FusionlabError, match="k=6"):
        omp(torch.randn(2, 3), atoms, k=6)
    with pytest.raises(FusionlabError, match="k=0"):
        omp(torch.randn(2, 3), atoms, k=0)
    with pytest.raises(FusionlabError, match="candidates=2"):
        omp(torch.randn(2, 3), atoms, k=3, candidates=2)
    with pytest.raises(FusionlabError, match="omp_k=0"):
        TokenizerConfig(source="union", fill="omp", omp_k=0)


def test_transplant_omp_same_space_donor_gives_its_rows(tmp_path, pair):  # noqa: F811
    """Model B is model A under a permuted tokenizer plus 3 tokens (random rows): every anchor row of B equals A's,
    so with k = hidden the OMP code reproduces B's row exactly in B's space, hence in A's: A's new rows == B's."""
    from transformers import AutoTokenizer

    a, b, perm = pair
    out = tmp_path / "omp"
    stats = transplant(a, f"model:{b}", out, fill="omp", omp_k=16, head_fill=None)
    assert stats["vocab/0/omp"] == len(EXTRA)  # the three tokens A lacks
    got, ra, rb = load_dir(out), load_dir(a), load_dir(b)
    tok_b = AutoTokenizer.from_pretrained(str(b))
    inverse = torch.empty(len(perm), dtype=torch.long)
    inverse[perm] = torch.arange(len(perm))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name][: len(perm)], ra[name][inverse])  # a token A spells keeps its own row
        for text in EXTRA:
            i = tok_b.convert_tokens_to_ids(text)
            assert torch.allclose(got[name][i], rb[name][i], atol=1e-3, rtol=1e-3), (name, text)
    with pytest.raises(FusionlabError, match="share only"):
        transplant(a, f"model:{b}", tmp_path / "too_many", fill="omp", omp_k=10_000)


def test_tokensurgeon_config_takes_omp():
    cfg = TokenSurgeonConfig(model="smollm2_135m", tokenizer="model:gemma3_270m", fill="omp")
    assert cfg.omp_k == 64
    with pytest.raises(FusionlabError, match="omp_k"):
        TokenSurgeonConfig(model="smollm2_135m", tokenizer="model:gemma3_270m", fill="omp", omp_k=-1)


def _tokens_a_lacks(out, b):
    from transformers import AutoTokenizer

    tok_b = AutoTokenizer.from_pretrained(str(b))
    return [tok_b.convert_tokens_to_ids(t) for t in EXTRA]


def test_head_fill_mean_keeps_input_rows_and_sets_lacking_output_rows_to_the_mean(tmp_path, pair):  # noqa: F811
    a, b, perm = pair
    filled, untied = tmp_path / "omp", tmp_path / "omp_head_mean"
    transplant(a, f"model:{b}", filled, fill="omp", omp_k=16, head_fill=None)
    transplant(a, f"model:{b}", untied, fill="omp", omp_k=16, head_fill="mean")
    f, u = load_dir(filled), load_dir(untied)
    new = _tokens_a_lacks(untied, b)
    kept = torch.ones(len(u["lm_head.weight"]), dtype=torch.bool)
    kept[new] = False
    assert torch.equal(u["model.embed_tokens.weight"], f["model.embed_tokens.weight"])  # input rows: the fill's
    assert torch.equal(u["lm_head.weight"][kept], f["lm_head.weight"][kept])  # the model's own output rows
    mean = f["lm_head.weight"][kept].mean(dim=0)
    for i in new:
        assert torch.allclose(u["lm_head.weight"][i], mean)
    with pytest.raises(FusionlabError, match="head_fill='zero'"):
        transplant(a, f"model:{b}", tmp_path / "bad", head_fill="zero")
    assert not (tmp_path / "bad").exists()


def test_head_fill_unties_a_tied_model_and_it_loads_untied(tmp_path, pair):  # noqa: F811
    import json

    from transformers import AutoModelForCausalLM

    a, b, _ = pair
    tied = tmp_path / "tied"
    tied.mkdir()
    sd = load_dir(a)
    sd.pop("lm_head.weight")
    from fusionlab.merge.io import save_state_dict  # the writer the tests' models use

    cfg = json.loads((a / "config.json").read_text())
    save_state_dict(sd, tied, {**cfg, "tie_word_embeddings": True})
    for p in a.iterdir():
        if p.name.startswith("tok") or p.name in ("special_tokens_map.json", "vocab.json", "merges.txt"):
            (tied / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "untied"
    transplant(tied, f"model:{b}", out, fill="omp", omp_k=16, head_fill="mean")
    got = load_dir(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    new = _tokens_a_lacks(out, b)
    assert not torch.equal(got["lm_head.weight"][new], got["model.embed_tokens.weight"][new])
    kept = torch.ones(len(got["lm_head.weight"]), dtype=torch.bool)
    kept[new] = False
    assert torch.equal(got["lm_head.weight"][kept], got["model.embed_tokens.weight"][kept])
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.lm_head.weight.detach()[new[0]], got["lm_head.weight"][new[0]])
