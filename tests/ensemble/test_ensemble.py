"""EVA decoding: filter truth table, identity ensembles, cache equivalence, text synchronisation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fusionlab.align import Alignment, align
from fusionlab.align.vocab import token_bytes
from fusionlab.ensemble import EvaDecoder, TextSync, complete_utf8, drop_filter, linear_sum, uniform

PROMPTS = ["Hello there, how", "The answer is", "A much longer prompt with many words in it to pad"]


def test_drop_filter_truth_table():
    # vocab of 4; model argmaxes: m0 -> 0, m1 -> 1, m2 -> 3
    d = torch.tensor([[[.5, .3, .2, 0.]], [[.3, .5, .2, 0.]], [[.1, .0, .2, .7]]])
    assert drop_filter(d, 1)[:, 0].tolist() == [True, True, True]  # nobody's argmax in another's top-1: keep all
    assert drop_filter(d, 2)[:, 0].tolist() == [True, True, False]  # m0/m1 in each other's top-2; m2's 3 nowhere
    assert drop_filter(d, 4)[:, 0].tolist() == [True, True, True]
    assert drop_filter(d, None)[:, 0].tolist() == [True, True, True]
    keep = torch.tensor([[True], [True], [False]])
    assert torch.allclose(uniform(d, keep), (d[0] + d[1]) / 2)
    assert torch.allclose(linear_sum(d, keep, [0.25, 0.25]), 0.5 * d[0] + 0.25 * d[1] + 0.25 * d[2])


def _greedy(model, tok, prompts, n):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    return [tok.decode(r) for r in out[:, enc.input_ids.shape[1]:]]


def test_identity_ensemble_reproduces_greedy(tiny_pair):
    (m, t), _ = tiny_pair
    ident = Alignment.identity(m.get_output_embeddings().weight.shape[0])
    d = EvaDecoder((m, t), [(m, t)], [ident], topk=320, drop=5)
    d.eos = set()  # a random model may hit EOS at any point; compare full lengths
    assert d.generate(PROMPTS, max_new_tokens=12).texts == _greedy(m, t, PROMPTS, 12)


@pytest.fixture(scope="module")
def exact_alignment(tiny_pair):
    (m, t), (g, gt) = tiny_pair
    return align(g, gt, m, t, "exact")


@pytest.mark.parametrize("sync", ["auto", "text"])
def test_cached_equals_uncached(tiny_pair, exact_alignment, sync):
    (m, t), (g, gt) = tiny_pair
    a = exact_alignment
    ident = Alignment.identity(m.get_output_embeddings().weight.shape[0])
    outs = []
    for use_cache in (True, False):
        d = EvaDecoder((m, t), [(m, t), (g, gt)], [ident, a], topk=50, drop=3, sync=sync, use_cache=use_cache)
        d.eos = set()
        outs.append(d.generate(PROMPTS[:2], max_new_tokens=6))
    assert outs[0].texts == outs[1].texts
    assert outs[0].stats["forward_tokens"] < outs[1].stats["forward_tokens"]


def test_sampling_is_seeded_and_stops(tiny_pair):
    (m, t), _ = tiny_pair
    ident = Alignment.identity(m.get_output_embeddings().weight.shape[0])
    d = EvaDecoder((m, t), [(m, t)], [ident], do_sample=True, temperature=0.7, seed=3, combiner="linear_sum")
    a, b = d.generate(PROMPTS, max_new_tokens=4), d.generate(PROMPTS, max_new_tokens=4)
    assert a.texts == b.texts and all(n <= 4 for n in a.new_tokens)


HARD = ["Hello world", "  two  spaces\n\nnew lines\n", "emoji 🙂👍🏽 ok", "中文字符，和日本語", "tab\tand  \u00e9t\u00e9 ",
        "12+35=47. The answer is 47.", "x\n  - item\n\t\tcode()"]


@pytest.mark.slow
@pytest.mark.parametrize("main_name,aux_name", [("smollm2_135m", "gemma3_270m"), ("gemma3_270m", "smollm2_135m")])
def test_text_sync_on_hard_strings(main_name, aux_name):
    """Feed text in main-model token pieces (splitting UTF-8 characters); the aux tokens spell it exactly."""
    from fusionlab.models import ModelSpec, load_tokenizer

    main = load_tokenizer(ModelSpec(name="m", source="embedded", path=main_name))
    aux = load_tokenizer(ModelSpec(name="a", source="embedded", path=aux_name))
    mt, at = token_bytes(main), token_bytes(aux)
    for text in HARD:
        ids = main(text, add_special_tokens=False)["input_ids"]
        sync, fed, seen = TextSync(aux), [], b""
        for i in ids:
            seen += mt[i]
            back, new = sync.update(seen)
            fed = fed[:len(fed) - back] + new if back else fed + new
            assert b"".join(at[t] for t in fed) == complete_utf8(seen)
        assert b"".join(at[t] for t in fed).decode() == text
        assert sync.mismatches == 0
        assert fed == aux(text, add_special_tokens=False)["input_ids"]  # same as tokenising the whole text


def test_complete_utf8():
    s = "a🙂é".encode()
    assert [complete_utf8(s[:n]) for n in range(len(s) + 1)] == [b"", b"a", b"a", b"a", b"a", "a🙂".encode(),
                                                                "a🙂".encode(), s]


@pytest.mark.slow
def test_cli_eva_addsub(tmp_path):
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=eva_addsub", "task.limit=2", "generation.max_new_tokens=8",
           "align_method.aux_vocab_cutoff=4096",  # a 4x cheaper first build than the experiment's 16384
           "logger=none", f"hydra.run.dir={tmp_path}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("ensemble_accuracy", "smollm2_135m_accuracy", "gemma3_270m_accuracy", "align_gemma3_270m_p_at_1",
                "ensemble_filter_kept_2_frac", "ensemble_tokens_per_s", "ensemble_speed_vs_members"):
        assert key in metrics, key
    assert metrics["align_gemma3_270m_p_at_1"] > 0.5
    assert len((tmp_path / "predictions.jsonl").read_text().splitlines()) == 2
