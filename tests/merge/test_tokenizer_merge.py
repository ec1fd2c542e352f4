"""Merging across tokenizers (fusionlab.merge.tokenizer): output vocabularies, rows from the alignment, transplants.

A tiny byte-level BPE tokenizer is trained on shipped texts; a second copy has its ids permuted and three
tokens added, and its model is the first model with the rows permuted the same way (plus random rows for the
added tokens): the same function under another tokenizer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import MergeConfig, merge, plan
from fusionlab.merge.tokenizer import RowRecipe, pieces, transplant
from tests.merge.conftest import TINY, load_dir, tiny_state, write_model

EXTRA = [" restaurant near", " family friendly", "<|tool|>"]


def _train_tokenizer(path: Path, texts: list[str], size: int = 300) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                            pad_token="<|endoftext|>").save_pretrained(str(path))


def _permute_tokenizer(src: Path, dst: Path, perm: list[int]) -> None:
    """dst: src's tokenizer with id i renamed perm[i] (merges are by string, so tokenisation is unchanged)."""
    dst.mkdir(parents=True, exist_ok=True)
    data = json.loads((src / "tokenizer.json").read_text())
    data["model"]["vocab"] = {t: perm[i] for t, i in data["model"]["vocab"].items()}
    for added in data["added_tokens"]:
        added["id"] = perm[added["id"]]
    (dst / "tokenizer.json").write_text(json.dumps(data))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("added_tokens_decoder", None)
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(model A + its tokenizer, model B = A under a permuted tokenizer with EXTRA tokens, the permutation)."""
    from fusionlab.tasks.texts import load_text_set
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tok_merge")
    tok_dir = root / "tok"
    _train_tokenizer(tok_dir, load_text_set("e2e", stop=300))
    vocab = len(AutoTokenizer.from_pretrained(str(tok_dir)))
    cfg = {**TINY, "vocab_size": vocab}
    sd = tiny_state(0, cfg)
    a = write_model(root / "a", sd, cfg)
    for f in tok_dir.iterdir():
        (a / f.name).write_bytes(f.read_bytes())
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(3)).tolist()
    b = root / "b"
    _permute_tokenizer(tok_dir, b, perm)
    tok_b = AutoTokenizer.from_pretrained(str(b))
    tok_b.add_tokens(EXTRA[:2])
    tok_b.add_special_tokens({"additional_special_tokens": [EXTRA[2]]})
    tok_b.save_pretrained(str(b))
    inverse = torch.empty(vocab, dtype=torch.long)
    inverse[torch.tensor(perm)] = torch.arange(vocab)
    g = torch.Generator().manual_seed(9)
    sd_b = dict(sd)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        sd_b[name] = torch.cat([sd[name][inverse], torch.randn(len(EXTRA), TINY["hidden_size"], generator=g)])
    cfg_b = {**cfg, "vocab_size": vocab + len(EXTRA)}
    write_model(b, sd_b, cfg_b)
    tok_b.save_pretrained(str(b))  # write_model replaced tokenizer_config.json
    return a, b, torch.tensor(perm)


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _cfg(out: Path, a: Path, b: Path, **kw) -> MergeConfig:
    return MergeConfig(method="linear", models=[{"model": str(a), "parameters": {"weight": 1.0}},
                                                {"model": str(b), "parameters": {"weight": 1.0}}],
                       output=str(out), progress=False, **kw)


def test_union_merge_with_itself_under_permuted_tokenizer_keeps_the_logits(tmp_path, pair):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a, b, _ = pair
    out = tmp_path / "union"
    merge(_cfg(out, a, b, tokenizer_source="union"))
    tok_a, tok = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(out))
    n_a = len(tok_a)
    assert len(tok) == n_a + len(EXTRA) == json.loads((out / "config.json").read_text())["vocab_size"]
    assert tok.convert_ids_to_tokens(list(range(n_a))) == tok_a.convert_ids_to_tokens(list(range(n_a)))
    assert tok.encode(" a restaurant near the river") != tok_a.encode(" a restaurant near the river")
    ids = torch.tensor([tok_a.encode("The Eagle is a family friendly coffee shop near the river.")])
    assert torch.allclose(_logits(out, ids)[..., :n_a], _logits(a, ids), atol=1e-5, rtol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(str(out))  # loads with the new tokenizer and generates
    gen = model.generate(torch.tensor([tok.encode(" a restaurant near")]), max_new_tokens=4, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == len(tok.encode(" a restaurant near")) + 4 and int(gen.max()) < len(tok)
    stats = json.loads((out / "fusionlab_vocabulary.json").read_text())
    assert stats["vocab/0/exact"] == n_a and stats["vocab/1/exact"] == n_a + len(EXTRA)
    # A's rows for the extras: the two text tokens from B's projection, the control token from its pieces
    assert (stats["vocab/0/aligned"], stats["vocab/0/pieces"]) == (2, 1) and "vocab/0/mean" not in stats


def test_base_source_maps_the_permuted_rows_back_bit_equal(tmp_path, pair):
    a, b, _ = pair
    out = tmp_path / "base"
    merge(_cfg(out, a, b, tokenizer_source="base"))
    merged, ref = load_dir(out), load_dir(a)
    assert merged.keys() == ref.keys()
    assert all(torch.equal(merged[n], ref[n]) for n in ref)  # (a + a) / 2 == a in fp32
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((a / "tokenizer.json").read_text())


def test_missing_rows_are_the_alignment_projection(tmp_path, pair):
    """A's rows for B's extra tokens: the norm-kept weighted mean of the A rows EVA's projection of B's row names."""
    from fusionlab.align import align
    from fusionlab.merge.io import CheckpointReader
    from fusionlab.merge.tokenizer import _Head, plan_vocabulary, tokenizer_config
    from fusionlab.merge.engine import MergeInput
    from transformers import AutoTokenizer

    a, b, _ = pair
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    inputs = [MergeInput("a", ra), MergeInput("b", rb)]
    vocab = plan_vocabulary(tokenizer_config(None, "union"), inputs, None)
    out_a = inputs[0].reader.get("lm_head.weight")
    head_a, head_b = ra.get("lm_head.weight"), rb.get("lm_head.weight")
    tok_a, tok_b = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(b))
    s = align(_Head(head_b), tok_b, _Head(head_a), tok_a)
    recipe = vocab.recipe(0)
    n_a = len(tok_a)
    for k, text in enumerate(EXTRA):
        b_id = tok_b.convert_tokens_to_ids(text)
        cols, vals = s.cols[b_id], s.vals[b_id]
        keep = (cols >= 0) & (vals > 0)
        if keep.any():
            w = vals[keep] / vals[keep].sum()
            rows = head_a[cols[keep]]
            want = w @ rows
            want = want * (w @ rows.norm(dim=1)) / want.norm()
        else:  # no projection entry (B's control token): the token's own pieces in A's vocabulary
            longest = max(len(t) for t in vocab.sides[0].index)
            rows = head_a[torch.tensor(pieces(text.encode(), vocab.sides[0].index, longest))]
            want = rows.mean(0) * (rows.norm(dim=1).mean() / rows.mean(0).norm())
        assert torch.allclose(out_a[n_a + k], want, atol=1e-6), text
        assert out_a[n_a + k].abs().sum() > 0 and not torch.allclose(out_a[n_a + k], head_a.mean(0))
    assert isinstance(recipe, RowRecipe)
    assert torch.equal(out_a[:n_a], head_a)


@pytest.mark.parametrize("fill", ["zero", "mean", "donor"])
def test_baseline_fills(tmp_path, pair, fill):
    from transformers import AutoTokenizer

    a, b, _ = pair
    out = tmp_path / fill
    merge(_cfg(out, a, b, tokenizer={"source": "union", "fill": fill}))
    merged, ra, rb = load_dir(out), load_dir(a), load_dir(b)
    n_a = ra["lm_head.weight"].shape[0]
    tok_b = AutoTokenizer.from_pretrained(str(b))
    b_rows = rb["lm_head.weight"][[tok_b.convert_tokens_to_ids(t) for t in EXTRA]]
    a_fill = {"zero": torch.zeros_like(b_rows), "mean": ra["lm_head.weight"].mean(0).expand_as(b_rows),
              "donor": b_rows}[fill]
    assert torch.allclose(merged["lm_head.weight"][n_a:], (a_fill + b_rows) / 2, atol=1e-6)


def test_tokens_section_entries(tmp_path, pair):
    a, b, _ = pair
    out = tmp_path / "entries"
    tokens = {" restaurant near": {"source": "zero", "force": True},
              " family friendly": {"source": str(b), "token": "<|tool|>"},
              "<|new|>": {"source": str(a), "token": "<|endoftext|>"}}
    merge(_cfg(out, a, b, tokenizer={"source": "union", "tokens": tokens, "pad_to_multiple_of": 8}))
    from transformers import AutoTokenizer

    tok, tok_a, tok_b = (AutoTokenizer.from_pretrained(str(p)) for p in (out, a, b))
    merged, ra, rb = load_dir(out), load_dir(a), load_dir(b)
    head = merged["lm_head.weight"]
    assert head.shape[0] % 8 == 0 and head.shape[0] >= len(tok) == len(tok_a) + len(EXTRA) + 1
    assert torch.equal(head[tok.convert_tokens_to_ids(" restaurant near")], torch.zeros(TINY["hidden_size"]))
    tool_b = rb["lm_head.weight"][tok_b.convert_tokens_to_ids("<|tool|>")]
    ff_b = rb["lm_head.weight"][tok_b.convert_tokens_to_ids(" family friendly")]
    assert torch.allclose(head[tok.convert_tokens_to_ids(" family friendly")], (tool_b + ff_b) / 2, atol=1e-6)
    eot_a = ra["lm_head.weight"][tok_a.convert_tokens_to_ids("<|endoftext|>")]
    assert torch.allclose(head[tok.convert_tokens_to_ids("<|new|>")], eot_a, atol=1e-6)


def test_transplant_onto_the_permuted_tokenizer(tmp_path, pair):
    from transformers import AutoTokenizer

    a, b, perm = pair
    out = tmp_path / "surgeon"
    stats = transplant(a, f"model:{b}", out)
    tok, tok_a = AutoTokenizer.from_pretrained(str(out)), AutoTokenizer.from_pretrained(str(a))
    assert stats["tokensurgeon_vocab"] == len(tok) == len(tok_a) + len(EXTRA)
    text = "The Eagle is a coffee shop near the river."
    ids_a, ids = torch.tensor([tok_a.encode(text)]), torch.tensor([tok.encode(text)])
    assert torch.equal(ids[0], perm[ids_a[0]])
    assert torch.allclose(_logits(out, ids)[..., perm], _logits(a, ids_a), atol=1e-5, rtol=1e-5)


def test_bad_tokenizer_inputs_fail_before_anything_is_written(tmp_path, pair):
    a, b, _ = pair
    with pytest.raises(FusionlabError, match="tokenizer source does not exist"):
        _cfg(tmp_path / "x", a, b, tokenizer_source="model:/no/such/dir")
    with pytest.raises(FusionlabError, match="both set"):
        _cfg(tmp_path / "x", a, b, tokenizer_source="union", tokenizer={"source": "union"})
    with pytest.raises(FusionlabError, match="fill"):
        _cfg(tmp_path / "x", a, b, tokenizer={"fill": "random"})
    family = write_model(tmp_path / "other", tiny_state(1))  # not an input of the merge
    with pytest.raises(FusionlabError, match="none of the merged models"):
        plan(_cfg(tmp_path / "x", a, b, tokenizer={"tokens": {" restaurant near": {"source": str(family)}}}))
    with pytest.raises(FusionlabError, match="tokenizer of"):  # a model without tokenizer files
        plan(_cfg(tmp_path / "x", a, family, tokenizer_source="union"))
    with pytest.raises(FusionlabError, match="tokenizer source does not exist"):
        transplant(a, "model:/no/such/dir", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_mergekit_union_config_runs_and_fill_donor_is_mergekits_rule(tmp_path, pair):
    """mergekit's tokenizer_source: union YAML runs in fusionlab; rows every model has are mergekit's exactly, and
    fill=donor (a token only one model has: that model's row) reproduces mergekit's whole result."""
    yaml = pytest.importorskip("yaml")
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from fusionlab.merge.mergekit_yaml import load_mergekit_config

    a, b, _ = pair
    raw = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": str(b), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "union.yml"
    path.write_text(yaml.safe_dump(raw))
    run_merge(MergeConfiguration.model_validate(raw), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True, write_model_card=False))
    merge(load_mergekit_config(path, tmp_path / "fl", progress=False))
    merge(_cfg(tmp_path / "donor", a, b, tokenizer={"source": "union", "fill": "donor"}))
    from transformers import AutoTokenizer

    mk, fl, donor = load_dir(tmp_path / "mk"), load_dir(tmp_path / "fl"), load_dir(tmp_path / "donor")
    # compared token by token: mergekit's union ids can come out in another order (they did, in a process that
    # had run other merges first), the rows of each token may not
    v_mk, v_fl = (AutoTokenizer.from_pretrained(str(tmp_path / d)).get_vocab() for d in ("mk", "donor"))
    assert v_mk.keys() == v_fl.keys()
    mk_ids = torch.tensor(list(v_mk.values()))
    fl_ids = torch.tensor([v_fl[t] for t in v_mk])
    shared = fl_ids < load_dir(a)["lm_head.weight"].shape[0]
    for name, t in mk.items():
        if name in ("lm_head.weight", "model.embed_tokens.weight"):
            assert torch.equal(donor[name][fl_ids], t[mk_ids]), name
            assert torch.equal(fl[name][fl_ids[shared]], t[mk_ids[shared]]), name
        else:
            assert torch.equal(donor[name], t) and torch.equal(fl[name], t), name


def _json_dirs(pair) -> list[Path]:
    """The tokenizers the JSON fast path is checked on: the fixture's two, and the embedded SmolLM2 / Gemma-3."""
    from fusionlab.models import embedded_checkpoint

    a, b, _ = pair
    dirs = [a, b]
    for name in ("smollm2_135m", "gemma3_270m"):
        try:
            dirs.append(Path(embedded_checkpoint(name)))
        except Exception:  # noqa: BLE001 - an embedded model that is not unpacked here: checked where it is
            pass
    return dirs


def test_json_tokenizer_is_transformers_tokenizer(tmp_path, pair):
    """JsonTokenizer (tokenizer.json read by the tokenizers library, no transformers) gives exactly what
    AutoTokenizer gives: vocabulary, added tokens, special ids and roles, surfaces, hash; after the same added tokens
    (plain and special) the same length and byte-identical files to save_pretrained's."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from fusionlab.align.vocab import special_ids, special_roles, tokenizer_hash
    from fusionlab.merge.tokenizer import JsonTokenizer, surfaces

    for d in _json_dirs(pair):
        fast, ref = JsonTokenizer.read(d), AutoTokenizer.from_pretrained(str(d))
        assert fast is not None, d
        assert len(fast) == len(ref) and fast.get_vocab() == ref.get_vocab(), d
        key = lambda t: (t.content, t.special, t.normalized, t.lstrip, t.rstrip, t.single_word)  # noqa: E731
        assert {i: key(t) for i, t in fast.added_tokens_decoder.items()} == \
            {i: key(t) for i, t in ref.added_tokens_decoder.items()}, d
        assert set(fast.all_special_ids) == set(ref.all_special_ids), d
        assert special_ids(fast) == special_ids(ref) and special_roles(fast) == special_roles(ref), d
        assert surfaces(fast) == surfaces(ref) and tokenizer_hash(fast) == tokenizer_hash(ref), d
        assert fast.eos_token == ref.eos_token and fast.eos_token_id == ref.eos_token_id, d
        for tok in (fast, ref):
            tok.add_tokens([AddedToken(" zqx restaurant", normalized=False, special=False),
                            AddedToken(" qqz", normalized=False, special=False)])
            tok.add_tokens([AddedToken("<|zz_tool|>", normalized=False, special=True)], special_tokens=True)
        assert len(fast) == len(ref) == len(ref.get_vocab()) and fast.get_vocab() == ref.get_vocab(), d
        out_fast, out_ref = tmp_path / f"{d.name}_fast", tmp_path / f"{d.name}_ref"
        out_fast.mkdir()
        fast.save_files(out_fast)
        ref.save_pretrained(str(out_ref))
        assert sorted(p.name for p in out_fast.iterdir()) == sorted(p.name for p in out_ref.iterdir()), d
        for f in out_ref.iterdir():
            assert (out_fast / f.name).read_bytes() == f.read_bytes(), (d, f.name)


def test_json_tokenizer_falls_back_to_transformers(tmp_path, pair):
    """A tokenizer the fast path is not known to reproduce (another class, a key that changes the build, extra
    tokenizer files, another model type) is read by transformers."""
    from fusionlab.merge.tokenizer import JsonTokenizer, load_tokenizer

    a, _, _ = pair
    base = json.loads((a / "tokenizer_config.json").read_text())
    cases = {"class": {**base, "tokenizer_class": "LlamaTokenizer"}, "key": {**base, "add_bos_token": True}}
    for name, cfg in cases.items():
        d = tmp_path / name
        d.mkdir()
        for f in ("tokenizer.json", "config.json"):
            (d / f).write_bytes((a / f).read_bytes())
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        assert JsonTokenizer.read(d) is None, name
        assert not isinstance(load_tokenizer(d, name), JsonTokenizer), name
    d = tmp_path / "files"
    d.mkdir()
    for f in ("tokenizer.json", "config.json", "tokenizer_config.json"):
        (d / f).write_bytes((a / f).read_bytes())
    (d / "special_tokens_map.json").write_text("{}")
    assert JsonTokenizer.read(d) is None
    (d / "special_tokens_map.json").unlink()
    (d / "config.json").write_text(json.dumps({**json.loads((a / "config.json").read_text()), "model_type": "qwen2"}))
    assert JsonTokenizer.read(d) is None


@pytest.mark.parametrize("fill", ["donor", "alignment", "mean"])
def test_json_tokenizer_merge_equals_the_transformers_path(tmp_path, pair, monkeypatch, fill):
    """The same union merge with the tokenizers read by JsonTokenizer and by transformers: bit-equal tensors,
    byte-identical tokenizer files, the same row counts."""
    from fusionlab.merge.tokenizer import JsonTokenizer

    a, b, _ = pair
    merge(_cfg(tmp_path / "fast", a, b, tokenizer={"source": "union", "fill": fill}))
    monkeypatch.setattr(JsonTokenizer, "read", classmethod(lambda cls, path: None))
    merge(_cfg(tmp_path / "ref", a, b, tokenizer={"source": "union", "fill": fill}))
    fast, ref = load_dir(tmp_path / "fast"), load_dir(tmp_path / "ref")
    assert fast.keys() == ref.keys() and all(torch.equal(fast[n], ref[n]) for n in ref)
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "fusionlab_vocabulary.json"):
        assert (tmp_path / "fast" / f).read_bytes() == (tmp_path / "ref" / f).read_bytes(), f


def test_row_recipe_identity_and_prefix_are_the_gather():
    """RowRecipe.apply's shortcuts (no copy for an identity map, one copy for a leading identity run) give what the
    plain gather gives."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(10, 4, generator=g)
    ident = RowRecipe.build(torch.arange(10), {}, [], {}, [])
    assert ident.identity and ident.apply(t, "x") is t
    perm = torch.tensor([0, 1, 2, 3, 7, 5, -1, 9, 8, 4, -1])
    r = RowRecipe.build(perm, {6: ([1, 2], [1.0, 1.0])}, [10], {}, [])
    assert not r.identity and r.prefix == 4
    want = t.index_select(0, perm.clamp_min(0))
    got = r.apply(t, "x")
    keep = [i for i in range(11) if i not in (6, 10)]
    assert torch.equal(got[keep], want[keep]) and torch.equal(got[10], t.mean(0))
    short = RowRecipe.build(torch.arange(8), {}, [], {}, [])  # the input has more rows than the output: cut
    assert torch.equal(short.apply(t, "x"), t[:8])
