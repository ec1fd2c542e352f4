"""Parallel members: the background catch-up of a main-only gate, and thread settings that never
oversubscribe the cores."""
from __future__ import annotations

import pytest
import torch

from fusionlab.align import align
from fusionlab.align.vecmap import usable_cores
from fusionlab.ensemble import EvaDecoder
from fusionlab.ensemble.config import DecodingOptions

PROMPTS = ["Hello there, how", "The answer is", "A much longer prompt with many words in it to pad"]


@pytest.fixture(scope="module")
def pair_and_alignment(tiny_pair):
    (m, t), (g, gt) = tiny_pair
    return (m, t), (g, gt), align(g, gt, m, t, "exact")


def _decode(main, aux, alignment, stop=(), **kw):
    # the aux model weighs 0.9 so that a fired step surely changes the output
    d = EvaDecoder(main, [aux], [alignment], topk=50, drop=None, combiner="linear_sum", weights=[0.9], threads=1, **kw)
    d.eos = set()
    return d.generate(PROMPTS, max_new_tokens=10, stop=stop)


def _threshold_firing_sometimes(main, aux, alignment) -> float:
    """A confidence threshold at which the gate fires on some row-steps but not all (a random tiny model's
    top-1 probabilities over its top-50 lie near 1/50: searched on a geometric grid from 0.01 to 0.1)."""
    for threshold in (0.01 * 10 ** (i / 20) for i in range(21)):
        stats = _decode(main, aux, alignment, gate="confidence", gate_threshold=threshold, parallel=False).stats
        if 0.2 <= stats["ensembled_row_steps"] / stats["row_steps"] <= 0.8:
            return threshold
    raise AssertionError("no threshold fires on 20-80% of the row-steps")


def test_background_catch_up_equals_members_in_turn(pair_and_alignment):
    """A gate firing on some steps: the aux model fed in the background (parallel members) gives exactly
    the output of the aux model fed in turn at fired steps, also when rows stop at different steps."""
    main, aux, alignment = pair_and_alignment
    threshold = _threshold_firing_sometimes(main, aux, alignment)
    in_turn = _decode(main, aux, alignment, gate="confidence", gate_threshold=threshold, parallel=False)
    fired = in_turn.stats["ensembled_row_steps"] / in_turn.stats["row_steps"]
    assert 0 < fired < 1
    always = _decode(main, aux, alignment, parallel=False)
    alone = _decode(main, aux, alignment, gate="confidence", gate_threshold=0.0, parallel=False)
    assert in_turn.texts != alone.texts and in_turn.texts != always.texts  # the gate's choices matter here
    stop = in_turn.texts[0][2:5]  # row 0 stops a few tokens in, the others run on: rows leave the batch
    outs = [_decode(main, aux, alignment, stop=[stop], gate="confidence", gate_threshold=threshold, parallel=p)
            for p in (False, True)]
    assert outs[0].texts == outs[1].texts and len(outs[0].texts[0]) < len(in_turn.texts[0])
    for key in ("ensembled_row_steps", "aux_forward_steps", "row_steps", "rollbacks", "sync_mismatches"):
        assert outs[0].stats[key] == outs[1].stats[key], key
    assert outs[1].stats["aux_background_forwards"] >= 1 and "aux_background_forwards" not in outs[0].stats
    # in turn the aux model only runs at fired steps; in the background it has seen every token by the end
    assert outs[1].stats["forward_tokens"] >= outs[0].stats["forward_tokens"]


def test_parallel_threshold_1_is_plain_eva_and_0_the_main_model(pair_and_alignment):
    main, aux, alignment = pair_and_alignment
    eva = _decode(main, aux, alignment)
    every = _decode(main, aux, alignment, gate="confidence", gate_threshold=1.0)
    never = _decode(main, aux, alignment, gate="confidence", gate_threshold=0.0)
    alone = EvaDecoder(main, topk=50)
    alone.eos = set()
    assert every.texts == eva.texts and never.texts == alone.generate(PROMPTS, max_new_tokens=10).texts
    # parallel members: the aux prefill (overlapping the main's) is used at step 1, later only fired steps
    assert never.stats["aux_forward_steps"] == 1 and every.stats["aux_forward_steps"] == every.stats["steps"]


@pytest.mark.parametrize("n_models", [1, 2, 3, 8])
def test_default_threads_never_oversubscribe_the_cores(n_models):
    cores = usable_cores()
    parallel = DecodingOptions().member_threads(n_models)
    assert parallel * n_models <= max(cores, n_models)  # members x threads <= cores (1 thread each at least)
    assert DecodingOptions(parallel=False).member_threads(n_models) == cores  # in turn: one member at a time
    assert DecodingOptions(threads=3).member_threads(n_models) == 3  # an explicit setting is kept


def test_generate_restores_the_callers_threads(pair_and_alignment):
    main, aux, alignment = pair_and_alignment
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        d = EvaDecoder(main, [aux], [alignment], topk=20)
        d.generate(PROMPTS[:1], max_new_tokens=2)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(saved)
