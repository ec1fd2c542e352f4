"""Per-step pieces of EVA decoding on plain tensors: top-k truncation, the drop filter, combiners.

A combiner turns the members' distributions in the main vocabulary ``dists`` (M, B, V; main
first) and the drop filter's verdict ``keep`` (M, B) into one distribution (B, V). It is one
function in :data:`COMBINERS`; its keyword parameters (``weights``) are read from its signature,
so the config accepts ``ensemble.weights`` only for a combiner that takes them.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence

import torch


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over each row's ``k`` largest logits: returns (probs (B, k), ids (B, k)), probs descending."""
    k = min(k, logits.shape[-1]) if k and k > 0 else logits.shape[-1]
    values, ids = logits.float().topk(k, dim=-1)
    return torch.softmax(values, dim=-1), ids


def dense(probs: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(probs.shape[0], vocab, dtype=probs.dtype, device=probs.device).scatter_(1, ids, probs)


def drop_filter(dists: torch.Tensor, n: int | None, keep_main: bool = False) -> torch.Tensor:
    """Which models to keep, (M, B) bool, for distributions ``dists`` (M, B, V) in one vocabulary.

    EVA: model m is kept iff its argmax is among the top-``n`` tokens of at least one other model;
    a row where no model is kept keeps them all. ``n=None`` (or one model) keeps everything.
    ``keep_main`` never drops model 0 (the others are still filtered against every model).
    """
    m = dists.shape[0]
    if n is None or m < 2:
        return torch.ones(dists.shape[:2], dtype=torch.bool, device=dists.device)
    top1 = dists.argmax(dim=-1)  # (M, B)
    topn = dists.topk(min(n, dists.shape[-1]), dim=-1).indices  # (M, B, n)
    hit = (top1[:, None, :, None] == topn[None, :, :, :]).any(dim=-1)  # hit[m, j, b]: argmax_m in topn_j
    hit &= ~torch.eye(m, dtype=torch.bool, device=dists.device)[:, :, None]
    keep = hit.any(dim=1)
    if keep_main:
        keep[0] = True
    none = ~keep.any(dim=0)
    return keep | none[None, :]


def _weighted(dists: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_m w[m, b]·dists[m, b] / Σ_m w[m, b]; a row whose weights are all zero falls back to the plain mean."""
    total = w.sum(dim=0, keepdim=True)
    w = torch.where(total > 0, w / total.clamp_min(1e-30), torch.full_like(w, 1.0 / w.shape[0]))
    return (dists * w[..., None]).sum(dim=0)


def uniform(dists: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """EVA: the plain average of the kept models' distributions."""
    k = keep.to(dists.dtype)[..., None]
    return (dists * k).sum(dim=0) / k.sum(dim=0).clamp_min(1)


def linear_sum(dists: torch.Tensor, keep: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """(1 − Σλ)·p_main + Σ λ_i·q_i over the kept models, renormalised (λ defaults to 1/M each: every model equal).

    The EVA reference passes M weights for M−1 aux models, which gives the main model weight 0;
    ``weights=[1.0]`` with one aux model reproduces that setting. A row whose kept models all have
    weight 0 uses every model's weight.
    """
    m = dists.shape[0]
    lam = torch.full((m - 1,), 1.0 / m) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if lam.numel() != m - 1:
        raise ValueError(f"linear_sum needs one weight per aux model ({m - 1}), got {lam.tolist()}")
    w = torch.cat([1 - lam.sum()[None], lam]).to(dists)[:, None].expand(m, dists.shape[1])
    kept = w * keep.to(dists.dtype)
    return _weighted(dists, torch.where(kept.sum(dim=0, keepdim=True) > 0, kept, w))


def confidence(dists: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Kept models weighted by their own top-1 probability at this step, renormalised.

    GaC weights members by a score (w = score / Σ score, its ``NORM_TYPE: score``); here the score
    is each member's per-step confidence, so a member that is unsure (flat distribution) counts less.
    """
    return _weighted(dists, dists.amax(dim=-1) * keep.to(dists.dtype))


COMBINERS: dict[str, Callable[..., torch.Tensor]] = {"uniform": uniform, "linear_sum": linear_sum,
                                                    "confidence": confidence}


def takes(fn: Callable, name: str) -> bool:
    """Whether a registered function has the keyword parameter ``name`` (registries read their options this way)."""
    return name in inspect.signature(fn).parameters
