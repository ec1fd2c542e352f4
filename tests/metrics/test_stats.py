"""Confidence intervals: Wilson against hand-computed values, the paired bootstrap against the exact
bootstrap distribution of a hand-made paired sample (all 5^5 resamples enumerated)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fusionlab.errors import FusionlabError
from fusionlab.metrics.stats import paired_bootstrap, wilson_interval

Z = 1.959963984540054  # the 97.5% normal quantile


def test_wilson_interval_by_hand():
    # 8 of 10: centre (0.8 + z²/20) / (1 + z²/10), half-width z·sqrt(0.016 + z²/400) / (1 + z²/10)
    denom = 1 + Z * Z / 10
    centre, half = (0.8 + Z * Z / 20) / denom, Z * math.sqrt(0.016 + Z * Z / 400) / denom
    assert wilson_interval(8, 10) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z * Z / (10 + Z * Z)))  # 0.2775: never degenerate at 0
    assert wilson_interval(10, 10) == (pytest.approx(10 / (10 + Z * Z)), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo90, hi90 = wilson_interval(8, 10, confidence=0.9)
    assert 0.4902 < lo90 and hi90 < 0.9433  # a lower confidence gives a narrower interval
    with pytest.raises(FusionlabError, match="successes"):
        wilson_interval(11, 10)


def test_paired_bootstrap_on_a_hand_made_sample():
    a, b = [1, 1, 0, 1, 0], [0, 1, 0, 0, 1]  # per-example correctness of two systems on the same 5 examples
    d = np.subtract(a, b)  # (1, 0, 0, 1, -1): mean 0.2
    exact = np.array([d[list(i)].mean() for i in itertools.product(range(5), repeat=5)])  # every resample, equally likely
    low, high = np.quantile(exact, [0.025, 0.975])
    assert (low, high) == (pytest.approx(-0.4), pytest.approx(0.8))  # P(mean <= -0.6) = 1.95%, P(mean >= 1) = 1.0%
    res = paired_bootstrap(a, b, resamples=20000, seed=0)
    assert res.diff == pytest.approx(0.2) and res.n == 5
    assert (res.low, res.high) == (pytest.approx(low), pytest.approx(high))
    assert paired_bootstrap(a, b, resamples=20000, seed=0) == res  # seeded
    # the pairing matters: identical systems differ by exactly 0 in every resample
    same = paired_bootstrap(a, a, resamples=500, seed=1)
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_rejects_unpaired_input():
    with pytest.raises(FusionlabError, match="equally long"):
        paired_bootstrap([1, 0], [1, 0, 1])


def test_corpus_bootstrap_of_a_mean_reproduces_the_paired_bootstrap():
    """A corpus metric that is a mean of one column (sum / count) is the per-example case: same draws, same interval."""
    from fusionlab.metrics.stats import paired_bootstrap_corpus

    rng = np.random.default_rng(1)
    x, y = rng.integers(0, 2, 37).astype(float), rng.integers(0, 2, 37).astype(float)
    ones = np.ones(37)
    mean = lambda s: s[0] / s[1]  # noqa: E731
    corpus = paired_bootstrap_corpus(np.stack([x, ones], 1), np.stack([y, ones], 1), mean, resamples=5000, seed=3)
    plain = paired_bootstrap(x, y, resamples=5000, seed=3)
    assert (corpus.diff, corpus.low, corpus.high, corpus.n) == (pytest.approx(plain.diff), pytest.approx(plain.low),
                                                                pytest.approx(plain.high), plain.n)
    alone = paired_bootstrap_corpus(np.stack([x, ones], 1), None, mean, resamples=5000, seed=3)
    assert alone.diff == pytest.approx(x.mean()) and alone.low <= alone.diff <= alone.high
    with pytest.raises(FusionlabError, match="equal shape"):
        paired_bootstrap_corpus(np.ones((3, 2)), np.ones((4, 2)), mean)


def test_corpus_bleu_from_summed_sentence_statistics_is_sacrebleus():
    """BLEU's sufficient statistics: summed over any subset they give sacrebleu's corpus BLEU of that subset."""
    from fusionlab.tasks.scoring import bleu, bleu_from_statistics, bleu_statistics

    refs = [["the cat sat on the mat", "a cat sat on a mat"], ["there is a dog in the park"],
            ["it rains today in the north", "rain in the north today", "today it rains up north"],
            ["the food is cheap and good"]]
    preds = ["the cat sat on a mat", "a dog is in the park", "it rains in the north", "cheap food"]
    rows = np.asarray(bleu_statistics(preds, refs))
    assert rows.shape == (4, 10)
    assert bleu_from_statistics(rows.sum(axis=0)) == pytest.approx(bleu(preds, refs))
    assert bleu_from_statistics(rows[[0, 2, 2]].sum(axis=0)) == pytest.approx(
        bleu([preds[0], preds[2], preds[2]], [refs[0], refs[2], refs[2]]))  # a bootstrap resample: repeats allowed
