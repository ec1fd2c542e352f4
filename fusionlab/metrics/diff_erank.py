"""Diff-eRank (Wei et al., NeurIPS 2024): how much redundancy a model removes from its representations.

For one text, R (N tokens x d) holds a model's hidden states. Center R over tokens, scale every
row to unit length (Z), and take the eigenvalues of the covariance Z^T Z / N normalised to sum 1:
the matrix entropy is H = -sum p log p and the effective rank eRank = exp(H).
Diff-eRank = eRank(untrained twin) - eRank(trained), the twin being the same architecture
initialised at random with a fixed seed.

Diff-eRank is the ``diff_erank`` member of the representation-metrics suite
(:mod:`fusionlab.metrics.suite`); the math is :func:`fusionlab.metrics.representation.prompt_entropy`
at alpha = 1 (the smaller of the N x N Gram and d x d covariance, ``eigvalsh`` in float64, padding
never enters, NaN is an error, never a silent 0 as in the reference's ``nansum``). This module
keeps the Diff-eRank entry points: :func:`evaluate_diff_erank`, :func:`model_entropies`, and the
shipped text set.

Dataset level, two averages over texts: ``geometric`` = exp(mean H), what the reference reports,
and ``arithmetic`` = mean of the per-text eRanks.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from fusionlab.metrics.representation import dataset_eranks, erank, matrix_entropy, prompt_entropy
from fusionlab.metrics.suite import MetricConfig, MetricsResult, evaluate_model, measure


def model_entropies(model, token_ids: Sequence[Sequence[int]], layers: Any = "last", batch_size: int = 8,
                    pad_id: int = 0, desc: str = "eRank") -> tuple[list[int], torch.Tensor]:
    """Per-text matrix entropies of a model's hidden states: (layer indices, tensor (n_layers, n_texts))."""
    cfg = MetricConfig(metrics=["diff_erank"], layers=layers, batch_size=batch_size)
    m = measure(model, token_ids, cfg, pad_id, desc=desc)
    return m.layers, m.per_text["entropy"]


def evaluate_diff_erank(spec, texts: Sequence[str], cfg: MetricConfig | None = None) -> MetricsResult:
    """Diff-eRank of the model of ``spec`` on ``texts`` (``cfg.metrics`` is set to ``[diff_erank]``)."""
    cfg = cfg or MetricConfig()
    if cfg.metrics != ["diff_erank"]:
        cfg = MetricConfig(**{**vars(cfg), "metrics": ["diff_erank"]})
    return evaluate_model(spec, texts, cfg)


__all__ = ["dataset_eranks", "erank", "evaluate_diff_erank", "matrix_entropy",
           "model_entropies", "prompt_entropy"]
