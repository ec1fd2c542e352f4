"""Uncertainty of evaluation numbers: a confidence interval for an accuracy and for a paired difference.

Small evaluation sets (tens to hundreds of examples) make a few points of accuracy noise, so every
comparison a job reports comes with an interval:

- :func:`wilson_interval`: the Wilson score interval of a proportion (closed form; unlike the normal
  approximation it stays inside [0, 1] and is not degenerate at 0 or n successes).
- :func:`paired_bootstrap`: the difference of two systems' mean scores on the SAME examples, with a
  percentile interval from resampling examples (both systems with the same resampled indices, so the
  interval reflects the per-example pairing, not two independent samples). Seeded.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

from fusionlab.errors import FusionlabError


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise FusionlabError(f"confidence={confidence} must be in (0, 1), e.g. 0.95.")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (low, high) for ``successes`` out of ``n``; (0, 1) when ``n`` is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise FusionlabError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}.")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends where rounding would leave 1e-17
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True)
class PairedDifference:
    """mean(a) − mean(b) over the same examples, with its bootstrap interval."""

    diff: float
    low: float
    high: float
    n: int
    resamples: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0,
                     confidence: float = 0.95) -> PairedDifference:
    """Percentile paired-bootstrap interval of mean(a) − mean(b); ``a[i]`` and ``b[i]`` score example i."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise FusionlabError(f"paired_bootstrap needs two equally long non-empty score lists, got {x.size} and {y.size}.")
    if resamples < 1:
        raise FusionlabError(f"paired_bootstrap resamples={resamples} must be >= 1.")
    _z(confidence)
    d = x - y
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 2_000_000 // d.size)  # bounded memory: at most ~2M indices at a time
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        means[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    alpha = 1 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return PairedDifference(float(d.mean()), float(low), float(high), int(d.size), resamples)


def paired_bootstrap_corpus(stats_a: Sequence[Sequence[float]], stats_b: Sequence[Sequence[float]] | None,
                            metric: Callable[[Sequence[float]], float], resamples: int = 10000, seed: int = 0,
                            confidence: float = 0.95) -> PairedDifference:
    """Percentile paired-bootstrap interval of a corpus-level metric (BLEU): ``metric(sum of a's rows)`` minus the
    same of b's, with the same resampled examples for both (Koehn, EMNLP 2004); ``stats_b`` None: the interval of
    a's metric itself. Rows are per-example sufficient statistics, so a resample sums rows instead of re-scoring.
    The resampling draws are :func:`paired_bootstrap`'s: a mean-of-one-column metric reproduces it (to rounding)."""
    systems = [np.asarray(x, dtype=np.float64) for x in (stats_a, stats_b) if x is not None]
    if systems[0].ndim != 2 or systems[0].shape[0] == 0 or any(x.shape != systems[0].shape for x in systems):
        raise FusionlabError(f"paired_bootstrap_corpus needs non-empty per-example statistics of equal shape, got "
                             f"{[x.shape for x in systems]}.")
    if resamples < 1:
        raise FusionlabError(f"paired_bootstrap_corpus resamples={resamples} must be >= 1.")
    _z(confidence)
    n = systems[0].shape[0]
    signs = (1.0, -1.0)[:len(systems)]  # a, or a - b
    rng = np.random.default_rng(seed)
    values = np.zeros(resamples)
    chunk = max(1, 200_000 // n)  # bounded memory (chunk x n x statistics); the draws do not depend on it
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        for sign, x in zip(signs, systems):
            values[start:stop] += [sign * metric(row) for row in x[idx].sum(axis=1)]
    alpha = 1 - confidence
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    point = sum(sign * metric(x.sum(axis=0)) for sign, x in zip(signs, systems))
    return PairedDifference(float(point), float(low), float(high), n, resamples)
