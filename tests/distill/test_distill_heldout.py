"""Held-out evaluation of distill runs: the split, assistant-token CE, intervals, and the MS map fixes."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fusionlab.distill.conversations import load_conversations, split_conversations
from fusionlab.distill.evaluation import assistant_ce, ce_metrics, task_metrics
from fusionlab.errors import FusionlabError


def convs(n):
    return [{"id": f"c{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                        {"role": "assistant", "content": f"a{i}"}]} for i in range(n)]


def test_heldout_split_is_seeded_disjoint_and_independent_of_the_training_slice():
    train, held, dev = split_conversations(convs(50), 10, seed=3, dev_size=5)
    ids_t, ids_h, ids_d = ({c["id"] for c in part} for part in (train, held, dev))
    assert (len(train), len(held), len(dev)) == (35, 10, 5)
    assert not ids_t & ids_h and not ids_t & ids_d and not ids_h & ids_d
    assert split_conversations(convs(50), 10, seed=3)[1] == held  # seeded; the dev slice does not move it
    assert {c["id"] for c in split_conversations(convs(50), 10, seed=4)[1]} != ids_h
    for heldout, dev_size in ((0, 0), (45, 5), (10, -1)):
        with pytest.raises(FusionlabError, match="distill.data.heldout"):
            split_conversations(convs(50), heldout, dev_size=dev_size)


def test_bad_data_settings_fail_before_anything_loads(tmp_path):
    from fusionlab.distill.config import DataConfig

    with pytest.raises(FusionlabError, match=r"distill\.data\.heldout=0 must be >= 1"):
        DataConfig(heldout=0)
    with pytest.raises(FusionlabError, match="leave no training conversation"):
        DataConfig(heldout=300, dev_size=200, dev=True)  # 500 of the 500 shipped
    with pytest.raises(FusionlabError, match=r"distill\.data\.dev_size=0 must be >= 1"):
        DataConfig(dev=True)  # a dev score needs a dev slice
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "hi"},
                                                             {"from": "gpt", "value": " "}]}) + "\n")
    with pytest.raises(FusionlabError, match="no assistant turn"):
        load_conversations(path)


def test_assistant_ce_equals_an_independent_masked_loss(smol_tok):
    from fusionlab.distill.representations import prepare_texts
    from fusionlab.models import build_random_model

    torch.manual_seed(0)
    model = build_random_model({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1},
                               seed=0, vocab_size=len(smol_tok))
    texts = prepare_texts(smol_tok, load_conversations("fusionlab/data/chat/alpaca_gpt4_500.jsonl", 3), 64)
    got = assistant_ce(model, smol_tok, texts, batch_size=2)  # batched and padded
    for t, ce in zip(texts, got):  # one text at a time through HF's own shifted loss, instruction tokens -100
        enc = smol_tok(t["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        labels = ids.clone()
        for n, (a, b) in enumerate(enc["offset_mapping"]):
            if not any(a < e and b > s for s, e in t["spans"]):
                labels[0, n] = -100
        with torch.no_grad():
            want = float(model(input_ids=ids, labels=labels).loss)
        assert ce == pytest.approx(want, rel=1e-4)


def test_intervals_and_paired_differences():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 0.3, 40).tolist()
    b = (np.asarray(a) + 0.1 + rng.normal(0, 0.01, 40)).tolist()  # b is worse than a on every conversation
    m = ce_metrics({"fused": a, "clm": b}, "heldout")
    assert m["heldout/ce/fused"] == pytest.approx(np.mean(a))
    assert m["heldout/ce/fused_low"] < m["heldout/ce/fused"] < m["heldout/ce/fused_high"]
    assert m["heldout/ppl/clm"] == pytest.approx(math.exp(np.mean(b)))
    d = m["heldout/ce_diff/fused_minus_clm"]
    assert d == pytest.approx(np.mean(a) - np.mean(b))
    # pairing: the per-conversation noise (sd 0.3) cancels, the interval is about ±0.003, not ±0.13
    assert m["heldout/ce_diff/fused_minus_clm_high"] < 0 and m["heldout/ce_diff/fused_minus_clm_high"] - d < 0.01
    t = task_metrics({"fused": [1, 1, 0, 1], "pivot": [0, 1, 0, 0]}, "accuracy")
    assert t["heldout/accuracy/fused"] == 0.75 and t["heldout/accuracy_diff/fused_minus_pivot"] == 0.5
    assert 0 < t["heldout/accuracy/pivot_low"] < 0.25 < t["heldout/accuracy/pivot_high"] < 1


def test_ms_map_takes_exact_matches_and_never_targets_pivot_specials(smol_tok, gemma_tok):
    """Real tokenizers: Gemma's pieces of SmolLM2's `<|im_end|>` template co-align with it, and MS used to map
    them onto it (teaching end-of-turn mid-text); `' Light'` used to go to a co-aligned `' L'`."""
    from fusionlab.align.mapping import build_vocab_map
    from fusionlab.align.token_align import align_tokens
    from fusionlab.align.vocab import special_ids, strip_marker, token_surfaces
    from fusionlab.distill.representations import prepare_texts, tokenize_with_spans

    ps, gs = token_surfaces(smol_tok), token_surfaces(gemma_tok)
    texts = prepare_texts(smol_tok, load_conversations("fusionlab/data/chat/alpaca_gpt4_500.jsonl", 4), 256)
    counts = {}
    for t in texts:
        p = tokenize_with_spans(smol_tok, t["text"], t["spans"], add_bos=False)
        g = tokenize_with_spans(gemma_tok, t["text"], t["spans"], add_bos=False)
        a = align_tokens(p["offsets"], g["offsets"], [strip_marker(ps[i]) for i in p["input_ids"]],
                         [strip_marker(gs[i]) for i in g["input_ids"]])
        pi, sj = a.pairs()
        for s, q in zip(g["input_ids"][sj].tolist(), p["input_ids"][pi].tolist()):
            counts[(s, q)] = counts.get((s, q), 0) + 1
    im_end = smol_tok.convert_tokens_to_ids("<|im_end|>")
    pieces = sorted({s for (s, q) in counts if q == im_end})
    assert len(pieces) >= 3 and {gs[s] for s in pieces} >= {"<", "|"}  # the template's pieces co-align with it
    light_g, light_p, l_p = (gemma_tok.convert_tokens_to_ids("▁Light"), smol_tok.convert_tokens_to_ids("ĠLight"),
                             smol_tok.convert_tokens_to_ids("ĠL"))
    assert gs[light_g] == ps[light_p] == " Light" and ps[l_p] == " L"
    counts[(light_g, l_p)] = 50  # co-aligned often with " L" (e.g. " Lightly" = " L" + "ightly")
    used = sorted({s for s, _ in counts})
    vmap = build_vocab_map("ms", used, gs, ps, counts=counts, pivot_specials=special_ids(smol_tok))
    assert not set(vmap[used].tolist()) & special_ids(smol_tok)
    assert vmap[light_g] == light_p
    old = build_vocab_map("ms", used, gs, ps, counts=counts)  # without the exclusion: the corruption is real
    assert im_end in set(old[pieces].tolist())
    for s in pieces:  # each piece maps onto its own surface when the pivot has one
        if gs[s] in set(ps):
            assert ps[vmap[s]] == gs[s]


def test_report_shows_pivot_clm_and_fused_side_by_side(tmp_path):
    from fusionlab.io import write_json
    from fusionlab.report import build_report

    m = {"job": "distill", "status": "ok",
         **ce_metrics({"pivot": [2.0, 2.2, 2.4], "clm": [1.9, 2.1, 2.3], "fused": [1.8, 2.1, 2.2]}, "heldout")}
    write_json(tmp_path / "runs" / "a" / "metrics.json", m)
    text = build_report([tmp_path / "runs"], tmp_path / "report").files["report.md"].read_text()
    table = text[text.index("## Held-out: pivot / CLM baseline / fused"):]
    header, _, row = table.splitlines()[4:7]
    assert [c.strip() for c in header.strip("|").split("|")] == ["run", "split", "metric", "n", "pivot", "clm",
                                                                   "fused", "fused − clm"]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:4] == ["runs/a", "heldout", "ce", "3"] and cells[4].startswith("2.2000 [")
    assert cells[7].startswith(f"{m['heldout/ce_diff/fused_minus_clm']:.4f} [")  # paired: -0.0667


def test_a_distill_job_ends_with_the_comparison_table_naming_the_task():
    from fusionlab.report.tables import comparison_markdown

    m = {**ce_metrics({"pivot": [2.0, 2.2, 2.4], "clm": [1.9, 2.1, 2.3], "fused": [1.8, 2.1, 2.2]}, "heldout"),
         **task_metrics({"pivot": [0, 1, 0, 0], "clm": [1, 1, 0, 0], "fused": [1, 1, 0, 1]}, "accuracy"),
         "heldout/task": "addsub_eq"}
    assert m["heldout/accuracy_examples"] == 4
    lines = comparison_markdown(m).splitlines()
    assert comparison_markdown({"final/train_loss": 1.0}) == ""  # nothing scored: no table
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in lines if line.startswith("| heldout")}
    assert rows["addsub_eq accuracy"][1:3] == ["addsub_eq accuracy", "4"]
    # fused 3/4, Wilson by hand: centre (0.75 + z²/8) / (1 + z²/4) = 0.6275, half-width 0.3269 (z = 1.96)
    assert rows["addsub_eq accuracy"][5] == "0.7500 [0.3006, 0.9544]"
    assert rows["ce"][2] == "3" and rows["ce"][6].startswith(f"{m['heldout/ce_diff/fused_minus_clm']:.4f} [")
