"""Vocabulary alignment: known answers, projection invariants, cache and bad input."""
from __future__ import annotations

import pytest
import torch

from fusionlab.align import Alignment, align
from fusionlab.align.alignment import load_alignment, save_alignment
from fusionlab.align.vecmap import csls_topk, supervised_map
from fusionlab.errors import FusionlabError


def test_vecmap_csls_recovers_a_permuted_noised_copy():
    g = torch.Generator().manual_seed(0)
    v, d = 400, 24
    z = torch.randn(v, d, generator=g)
    perm = torch.randperm(v, generator=g)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = z[perm] @ q + 0.01 * torch.randn(v, d, generator=g)  # aux row i is main token perm[i]
    seed = torch.arange(0, v, 2)  # half the pairs as the seed dictionary
    xm, zm = supervised_map(x, z, seed, perm[seed])
    cols, vals, top1 = csls_topk(xm, zm, k=3, block=64)
    test = torch.arange(1, v, 2)
    assert (top1[test] == perm[test]).float().mean() >= 0.99
    assert (cols[:, 0] == perm).float().mean() >= 0.99
    # The pruned one-pass search equals an exact dense CSLS.
    xu, zu = xm / xm.norm(dim=1, keepdim=True), zm / zm.norm(dim=1, keepdim=True)
    sim = xu @ zu.T
    dense = 2 * sim - sim.max(dim=0).values
    assert torch.equal(top1, dense.argmax(dim=1))


def test_supervised_map_handles_different_hidden_sizes():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(200, 16, generator=g), torch.randn(150, 12, generator=g)
    xm, zm = supervised_map(x, z, torch.arange(100), torch.arange(100))
    assert xm.shape == (200, 12) and zm.shape == (150, 12)


def test_projection_mass_and_identity():
    a = Alignment(torch.tensor([[0, 2], [1, -1], [-1, -1]]), torch.tensor([[0.3, 0.1], [0.5, 0.0], [0.0, 0.0]]), 3)
    p = torch.tensor([[0.5, 0.3, 0.2]])
    q = a.project(p, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(q, torch.tensor([[0.5 * 0.3, 0.3 * 0.5, 0.5 * 0.1]]))  # raw scores: mass not kept
    qn = a.normalized().project(p, torch.tensor([[0, 1, 2]]))
    assert torch.allclose(qn.sum(), torch.tensor(0.8))  # all mass of mapped rows (token 2 maps nowhere)
    assert torch.allclose(qn, torch.tensor([[0.5 * 0.75, 0.3, 0.5 * 0.25]]))
    assert torch.allclose(a.project(torch.tensor([[0.5, 0.3, 0.2]])), q)  # dense input path
    assert torch.allclose(a.to_sparse().to_dense().T @ p[0], q[0])
    ident = Alignment.identity(3)
    assert torch.equal(ident.project(p, torch.tensor([[0, 1, 2]])), p)


class _NoHead(torch.nn.Module):
    def get_output_embeddings(self):
        return None


def test_model_without_output_embeddings_is_a_clear_error(tiny_pair):
    (m, t), _ = tiny_pair
    with pytest.raises(FusionlabError, match="no output embedding"):
        align(_NoHead(), t, m, t, "exact")


def test_no_shared_tokens_is_a_clear_error():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    def tok(words):
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])))

    from fusionlab.align import seed_dictionary
    with pytest.raises(FusionlabError, match="share no tokens"):
        seed_dictionary(tok(["[u]", "alpha", "beta"]), tok(["[v]", "gamma", "delta"]))


def test_cache_hit_stale_and_corrupt(tiny_pair, tmp_path):
    (m, t), (g, gt) = tiny_pair
    a = align(g, gt, m, t, "exact", cache_dir=tmp_path)
    assert a.stats["cache_hit"] == 0 and a.stats["p_at_1"] == 1.0 and a.stats["seed_pairs"] > 10000
    b = align(g, gt, m, t, "exact", cache_dir=tmp_path)
    assert b.stats["cache_hit"] == 1 and torch.equal(a.cols, b.cols)
    path = next(tmp_path.glob("*.safetensors"))
    # stale: a file under this key whose content was built for other inputs is never used
    save_alignment(path, Alignment(a.cols, a.vals, a.main_vocab, "exact", {}, key="other"))
    assert load_alignment(path, a.key, a.aux_vocab, a.main_vocab) is None
    c = align(g, gt, m, t, "exact", cache_dir=tmp_path)
    assert c.stats["cache_hit"] == 0
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(FusionlabError, match="corrupt"):
        align(g, gt, m, t, "exact", cache_dir=tmp_path)
    assert align(g, gt, m, t, "exact", cache_dir=tmp_path, rebuild=True).stats["cache_hit"] == 0
    # a changed model (different lm_head) gets a different key: the old file is not used
    with torch.no_grad():
        g.get_output_embeddings().weight[5] += 1
    assert align(g, gt, m, t, "exact", cache_dir=tmp_path).key != a.key


class _Head(torch.nn.Module):
    """Just an output embedding matrix: all the surface-form methods need from a model."""

    def __init__(self, vocab: int):
        super().__init__()
        self.head = torch.nn.Linear(4, vocab, bias=False)

    def get_output_embeddings(self):
        return self.head


def _word_tokenizer(words):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0])),
                                   unk_token=words[0])


def test_mined_maps_to_minimum_edit_distance_on_a_small_vocabulary(tmp_path):
    main_words = ["[u]", "cat", "dog", "house", "mouse", "the", "zebra"]
    aux_words = ["[v]", "cats", "hose", "dig", "cat", "the", "zebr"]
    main_tok, aux_tok = _word_tokenizer(main_words), _word_tokenizer(aux_words)
    a = align(_Head(len(aux_words)), aux_tok, _Head(len(main_words)), main_tok, "mined", cache_dir=tmp_path)
    got = {aux_words[i]: main_words[int(a.cols[i, 0])] for i in range(len(aux_words)) if a.cols[i, 0] >= 0}
    # exact matches first (cat, the), then min edit distance: cats->cat (1), hose->house (1, mouse is 2),
    # dig->dog (1), zebr->zebra (1); the unk token maps by role, not by id or spelling
    assert got == {"[v]": "[u]", "cats": "cat", "hose": "house", "dig": "dog", "cat": "cat", "the": "the",
                   "zebr": "zebra"}
    assert a.stats["mined_rows"] == 4 and a.stats["seed_pairs"] == 2
    assert torch.equal(a.vals[:, 0], (a.cols[:, 0] >= 0).float())
    ex = align(_Head(len(aux_words)), aux_tok, _Head(len(main_words)), main_tok, "exact")
    assert [main_words[int(c)] if c >= 0 else None for c in ex.cols[:, 0]] == ["[u]", None, None, None, "cat", "the", None]


def test_unknown_align_option_is_named():
    with pytest.raises(FusionlabError, match=r"\['neighbourhood'\].*vecmap_csls"):
        align(_Head(3), None, _Head(3), None, "vecmap_csls", neighbourhood=1)


def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_mined_core_is_the_first_minimum_edit_distance_in_any_block_size():
    import random

    from fusionlab.align.vocab import nearest_by_edit_distance

    rng = random.Random(0)
    words = lambda n, m: ["".join(rng.choice("abcé") for _ in range(rng.randint(1, m))) for _ in range(n)]  # noqa: E731
    queries, candidates = words(120, 5), words(60, 4)
    expected = []
    for q in queries:
        d = [_levenshtein(q, c) for c in candidates]
        expected.append(d.index(min(d)))  # the first candidate on ties
    for max_cells in (60, 61 * 7, 2**26):  # one query per block, ragged blocks, one block
        assert nearest_by_edit_distance(queries, candidates, max_cells=max_cells).tolist() == expected
    assert nearest_by_edit_distance([], candidates).tolist() == []
    with pytest.raises(FusionlabError, match="candidate"):
        nearest_by_edit_distance(["a"], [])


def test_surface_index_is_the_one_exact_match():
    from fusionlab.align.vocab import surface_index

    surfaces = [b"\n", b"a", b"\n", b"", None, b"a", b"b"]
    raw = ["<0x0A>", "a", "\n", "", None, "a", "<b>"]
    assert surface_index(surfaces, raw) == {b"\n": 2, b"a": 1, b"b": 6}  # shortest raw spelling, else the first id
    assert surface_index(surfaces) == {b"\n": 0, b"a": 1, b"b": 6}  # no raw spellings: the first id
    assert surface_index(surfaces, raw, skip={6}, limit=3) == {b"\n": 2, b"a": 1}


def test_method_options_are_read_from_the_signature(tmp_path):
    import dataclasses

    from fusionlab.align.methods import ALIGN_METHODS, AlignOptions, align_method

    calls = []

    def shifted(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str, shift: int = 1,
                progress: bool = False) -> Alignment:
        """Aux id i -> main id i + shift (a method defined in one place: this function)."""
        calls.append({"seed_mode": seed_mode, "shift": shift, "progress": progress})
        n = output_embeddings_rows(aux_model)
        cols = ((torch.arange(n) + shift) % n)[:, None]
        return Alignment(cols, torch.ones(n, 1), n, "shifted", {"p_at_1": 0.0})

    try:
        align_method(shifted)
        options = ALIGN_METHODS["shifted"].options
        assert issubclass(options, AlignOptions) and options.__name__ == "ShiftedOptions"
        fields = {f.name: f.default for f in dataclasses.fields(options)}
        assert fields["shift"] == 1 and fields["name"] == "shifted" and fields["seed_mode"] == "normalized"
        tok = _word_tokenizer(["[u]", "a", "b", "c", "d"])
        a = align(_Head(5), tok, _Head(5), tok, "shifted", shift=2, progress=True, cache_dir=tmp_path)
        assert a.cols[1:, 0].tolist() == [3, 4, 0, 1]  # (id 0, the unk token, maps by role)
        assert calls == [{"seed_mode": "normalized", "shift": 2, "progress": True}]
        with pytest.raises(FusionlabError, match=r"\['shfit'\].*shifted"):
            align(_Head(5), None, _Head(5), None, "shifted", shfit=2)

        def restated(aux_model, aux_tok, main_model, main_tok, *, holdout: float = 0.2) -> Alignment:
            raise AssertionError("never called")

        with pytest.raises(TypeError, match="holdout"):  # a shared option's default is stated once, in AlignOptions
            align_method(restated)
        assert "restated" not in ALIGN_METHODS
    finally:
        ALIGN_METHODS.pop("shifted", None)


def output_embeddings_rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def test_align_method_options_are_typed_at_compose(compose):
    from fusionlab.schema import validate

    cfg = compose(["+experiment=eva_addsub", "align_method.aux_vocab_cutoff=16384"])
    assert type(validate(cfg).align_method).__name__ == "VecmapCslsOptions"
    assert cfg.align_method.aux_vocab_cutoff == 16384 and cfg.align_method.k == 10  # override + code default
    assert validate(compose(["+align_method=exact"])).align_method.aux_vocab_cutoff is None  # default: all ids
    from fusionlab.schema import config_error_message

    for overrides, named in [(["align_method.k=abc"], "'abc' of type 'str' could not be converted to Integer"),
                             (["align_method=exact", "align_method.k=3"], "Key 'k' not in 'ExactOptions'")]:
        with pytest.raises(Exception) as err:  # at compose: the CLI prints this message and exits 2
            compose(["+experiment=eva_addsub", *overrides])
        assert named in config_error_message(err.value)
    for bad, match in [("align_method.k=0", r"align_method\.k=0 .* >= 1"),
                       ("align_method.holdout=1.0", r"align_method\.holdout=1\.0 .* \[0, 1\)"),
                       ("align_method.seed_mode=bytes", r"seed_mode='bytes'"),
                       ("align_method.std_filter=[5]", r"std_filter"),
                       ("align_method.name=exact", r"does not match"),
                       ("+align_method.kk=3", r"\['kk'\] in align_method")]:
        with pytest.raises(FusionlabError, match=match):
            validate(compose(["+experiment=eva_addsub", bad]))


def _dense_csls(x, z, rows, targets, k, neighborhood):
    """float64 CSLS over the full score matrix (small sizes only): the definition, written plainly."""
    x, z = x.double(), z.double()
    x, z = x / x.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    sim = x[rows] @ z[targets].T
    r = sim.topk(neighborhood, dim=0).values.mean(dim=0)
    v, c = (2 * sim - r).topk(k, dim=1)
    return v, targets[c]


@pytest.mark.parametrize("neighborhood", [1, 3])
def test_csls_bfloat16_search_gives_the_exact_float64_top_k(neighborhood):
    g = torch.Generator().manual_seed(3)
    x, z = torch.randn(1500, 48, generator=g), torch.randn(900, 48, generator=g)
    rows = torch.arange(0, 1500, 3)[1:]  # a subset of source rows (specials left out), r(j) over them only
    excluded = torch.tensor([0, 5, 899])
    targets = torch.tensor([j for j in range(900) if j not in excluded.tolist()])
    ref_v, ref_c = _dense_csls(x, z, rows, targets, 5, neighborhood)
    for dtype in ("bfloat16", "float32"):
        cols, vals, top1 = csls_topk(x, z, k=5, neighborhood=neighborhood, threshold=-1e9, std_filter=None,
                                     excluded_cols=excluded, rows=rows, block=128, search_dtype=dtype)
        assert torch.equal(cols[rows], ref_c), dtype
        assert torch.allclose(vals[rows].double(), ref_v, atol=1e-5), dtype
        assert torch.equal(top1[rows], ref_c[:, 0]) and bool((cols[[0, 1, 2]] == -1).all())  # rows not computed


def _tied_pair(words: int = 40, padding: int = 8, dim: int = 16):
    """Aux and main "models" over the same words, main a rotated noised copy of aux, and main's lm_head
    with ``padding`` rows past its tokenizer that copy real rows (so they tie with them exactly)."""
    g = torch.Generator().manual_seed(4)
    vocab = ["[u]", *[f"w{i}" for i in range(words - 1)]]
    tok = _word_tokenizer(vocab)
    aux, main = _Head(words), _Head(words + padding)
    x = torch.randn(words, dim, generator=g)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    z = x @ q + 0.01 * torch.randn(words, dim, generator=g)
    aux.head.weight = torch.nn.Parameter(x)
    main.head.weight = torch.nn.Parameter(torch.cat([z, z[1:1 + padding]]))
    return aux, main, tok


def test_vecmap_csls_never_targets_main_rows_past_the_tokenizer():
    aux, main, tok = _tied_pair()
    a = align(aux, tok, main, tok, "vecmap_csls", holdout=0.0)
    assert a.main_vocab == 48 and int(a.cols.max()) < len(tok)  # padding rows 40..47 are never targets
    assert (a.cols[1:, 0] == torch.arange(1, 40)).all()  # each word still finds itself


def test_p_at_1_is_measured_on_the_whole_seed_dictionary(tiny_pair):
    from fusionlab.align.vocab import seed_dictionary, split_seed

    (m, t), (g, gt) = tiny_pair
    pairs = seed_dictionary(gt, t, "normalized", g.get_output_embeddings().weight.shape[0],
                            m.get_output_embeddings().weight.shape[0])
    _, test = split_seed(pairs, 0.1, 0)
    inside = float((test[:, 0] < 2000).float().mean())
    a = align(g, gt, m, t, "vecmap_csls", aux_vocab_cutoff=2000)
    # pairs past the cutoff are held out too and count as misses: P@1 can never exceed their complement
    assert a.stats["test_pairs"] == len(test) and a.stats["seed_pairs"] == len(pairs)
    assert inside < 0.2 and a.stats["p_at_1"] <= inside
    assert a.stats["p_at_1"] == pytest.approx(a.stats["p_at_1_inside_cutoff"] * inside, abs=1e-6)


def test_cache_key_hashes_the_effective_options(tmp_path):
    from fusionlab.align.methods import align_options, effective_key_params

    aux, main, tok = _tied_pair()
    key = align(aux, tok, main, tok, "exact", cache_dir=tmp_path).key
    # a cutoff at or past the aux vocabulary is no cutoff: the same alignment, the same cache file
    assert align(aux, tok, main, tok, "exact", aux_vocab_cutoff=40, cache_dir=tmp_path).key == key
    assert align(aux, tok, main, tok, "exact", aux_vocab_cutoff=39, cache_dir=tmp_path).key != key
    # the YAML's std_filter (floats, via OmegaConf) and the signature's default (5, 0.01) are one option value
    assert (effective_key_params(align_options("vecmap_csls", std_filter=[5.0, 0.01]), 100)
            == effective_key_params(align_options("vecmap_csls"), 100))
    # how the search runs is no part of the key
    assert (effective_key_params(align_options("vecmap_csls", search_dtype="float32", block=7), 100)
            == effective_key_params(align_options("vecmap_csls"), 100))


def test_composed_default_options_share_the_python_api_cache_entry(compose):
    from fusionlab.align.methods import align_options, effective_key_params
    from fusionlab.schema import validate

    composed = validate(compose(["+align_method=vecmap_csls"])).align_method
    assert composed.aux_vocab_cutoff is None  # the default is the whole aux vocabulary
    assert effective_key_params(composed, 262144) == effective_key_params(align_options("vecmap_csls"), 262144)


def test_build_uses_the_usable_cores_and_restores_threads(tmp_path):
    from fusionlab.align.methods import ALIGN_METHODS, align_method
    from fusionlab.align.vecmap import usable_cores

    seen = []

    def counting(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str) -> Alignment:
        seen.append(torch.get_num_threads())
        n = output_embeddings_rows(aux_model)
        return Alignment(torch.arange(n)[:, None], torch.ones(n, 1), n, "counting", {"p_at_1": 1.0})

    saved = torch.get_num_threads()
    try:
        align_method(counting)
        torch.set_num_threads(1)
        tok = _word_tokenizer(["[u]", "a", "b"])
        align(_Head(3), tok, _Head(3), tok, "counting")
        assert seen == [usable_cores()] and torch.get_num_threads() == 1
    finally:
        ALIGN_METHODS.pop("counting", None)
        torch.set_num_threads(saved)
