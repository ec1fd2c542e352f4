"""Per-step pieces of EVA decoding: top-k truncation, the drop filter, combiners (plain tensors)."""
from __future__ import annotations

from typing import Callable

import torch


def topk_probs(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over each row's ``k`` largest logits: returns (probs (B, k), ids (B, k))."""
    k = min(k, logits.shape[-1]) if k and k > 0 else logits.shape[-1]
    values, ids = logits.float().topk(k, dim=-1)
    return torch.softmax(values, dim=-1), ids


def dense(probs: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.zeros(probs.shape[0], vocab, dtype=probs.dtype, device=probs.device).scatter_(1, ids, probs)


def drop_filter(dists: torch.Tensor, n: int | None) -> torch.Tensor:
    """Which models to keep, (M, B) bool, for distributions ``dists`` (M, B, V) in one vocabulary.

    Model m is kept iff its argmax is among the top-``n`` tokens of at least one other model;
    a row where no model is kept keeps them all. ``n=None`` (or one model) keeps everything.
    """
    m = dists.shape[0]
    if n is None or m < 2:
        return torch.ones(dists.shape[:2], dtype=torch.bool, device=dists.device)
    top1 = dists.argmax(dim=-1)  # (M, B)
    topn = dists.topk(min(n, dists.shape[-1]), dim=-1).indices  # (M, B, n)
    hit = (top1[:, None, :, None] == topn[None, :, :, :]).any(dim=-1)  # hit[m, j, b]: argmax_m in topn_j
    hit &= ~torch.eye(m, dtype=torch.bool, device=dists.device)[:, :, None]
    keep = hit.any(dim=1)
    none = ~keep.any(dim=0)
    return keep | none[None, :]


def uniform(dists: torch.Tensor, keep: torch.Tensor, weights=None) -> torch.Tensor:
    """EVA: the plain average of the kept models' distributions."""
    k = keep.to(dists.dtype)[..., None]
    return (dists * k).sum(dim=0) / k.sum(dim=0).clamp_min(1)


def linear_sum(dists: torch.Tensor, keep: torch.Tensor, weights=None) -> torch.Tensor:
    """(1 − Σλ)·p_main + Σ λ_i·q_i over the aux models (λ defaults to 1/M each: every model equal).

    The EVA reference passes M weights for M−1 aux models, which gives the main model weight 0;
    ``weights=[1.0]`` with one aux model reproduces that setting.
    """
    m = dists.shape[0]
    lam = torch.full((m - 1,), 1.0 / m) if weights is None else torch.as_tensor(list(weights), dtype=torch.float32)
    if lam.numel() != m - 1:
        raise ValueError(f"linear_sum needs one weight per aux model ({m - 1}), got {lam.tolist()}")
    w = torch.cat([1 - lam.sum()[None], lam]).to(dists)
    return (dists * w[:, None, None]).sum(dim=0)


COMBINERS: dict[str, Callable[..., torch.Tensor]] = {"uniform": uniform, "linear_sum": linear_sum}
