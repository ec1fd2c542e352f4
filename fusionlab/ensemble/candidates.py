"""Candidate rules: how each member's next-token distribution in the main vocabulary is formed.

A rule takes every member's logits (main first, each in its own vocabulary), one
:class:`Projection` per aux model and ``k``, and returns the members' distributions over the
main vocabulary (M, B, V) plus the aux probability mass that projects nowhere (M−1, B). It is
one function in :data:`CANDIDATES`.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fusionlab.align.alignment import Alignment
from fusionlab.ensemble.combine import dense, topk_probs


class Projection:
    """One aux→main alignment as the decoder uses it: top-k projection and, built on first use,
    the reverse index (main token → the aux tokens that project onto it) that ``union`` reads."""

    def __init__(self, alignment: Alignment):
        self.alignment = alignment
        self.mapped = (alignment.cols >= 0).any(dim=1)  # (aux_vocab,): rows with at least one main entry
        self._reverse: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def main_vocab(self) -> int:
        return self.alignment.main_vocab

    def project(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """S^T p for aux probabilities ``probs`` (B, k) over aux ids ``ids`` (B, k): (B, main_vocab)."""
        return self.alignment.project(probs, ids)

    def unmapped(self, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The part of ``probs`` (B, k) on aux ids whose alignment row is empty: (B,)."""
        inside = ids < self.mapped.shape[0]
        hit = self.mapped[ids.clamp_max(self.mapped.shape[0] - 1)] & inside
        return (probs * (~hit).to(probs.dtype)).sum(dim=-1)

    def best_targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Each aux id's strongest main token (same shape as ``ids``), -1 where it maps nowhere."""
        ids = ids.clamp_max(self.alignment.aux_vocab - 1)
        cols, vals = self.alignment.cols[ids], self.alignment.vals[ids]
        best = torch.where(cols >= 0, vals, torch.full_like(vals, -float("inf"))).argmax(dim=-1, keepdim=True)
        return cols.gather(-1, best)[..., 0]

    def mass_onto(self, probs: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Σ_a S[a, u]·probs[b, a] for each pair (b, u) = (``rows[i]``, ``targets[i]``): (N,).

        ``probs`` (B, aux_vocab) is an aux model's full distribution; only the aux tokens that
        project onto the listed main tokens are read (through the reverse index).
        """
        indptr, aux_ids, vals = self._reverse_index()
        starts = indptr[targets]
        lens = indptr[targets + 1] - starts
        out = torch.zeros(targets.shape[0], dtype=probs.dtype, device=probs.device)
        total = int(lens.sum())
        if total == 0:
            return out
        pair = torch.repeat_interleave(torch.arange(targets.shape[0], device=targets.device), lens)
        first = torch.repeat_interleave(lens.cumsum(0) - lens, lens)
        pos = starts[pair] + torch.arange(total, device=targets.device) - first
        contrib = vals[pos].to(probs.dtype) * probs[rows[pair], aux_ids[pos]]
        return out.index_add_(0, pair, contrib)

    def _reverse_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """S^T in CSR form: (indptr (V+1,), aux ids, weights), entries grouped by main token."""
        if self._reverse is None:
            a = self.alignment
            mask = a.cols >= 0
            rows = torch.arange(a.aux_vocab, device=a.cols.device)[:, None].expand_as(a.cols)[mask]
            cols, vals = a.cols[mask], a.vals[mask]
            order = torch.argsort(cols, stable=True)
            counts = torch.bincount(cols, minlength=a.main_vocab)
            indptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
            self._reverse = indptr, rows[order], vals[order]
        return self._reverse


def own(logits: Sequence[torch.Tensor], projections: Sequence[Projection], k: int,
        main_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EVA: each member keeps its own top-k tokens; an aux distribution is then projected (S^T q)."""
    p, ids = topk_probs(logits[0], k)
    dists, unmapped = [dense(p, ids, main_vocab)], []
    for lg, proj in zip(logits[1:], projections):
        q, qids = topk_probs(lg, k)
        q, qids = q.to(p.device), qids.to(p.device)
        dists.append(proj.project(q, qids))
        unmapped.append(proj.unmapped(q, qids))
    return torch.stack(dists), _stack(unmapped, p)


def union(logits: Sequence[torch.Tensor], projections: Sequence[Projection], k: int,
          main_vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """UniTE (Yao et al., ICLR 2025): every member is scored on the union U of all members' top-k.

    U, in the main vocabulary, holds the main model's top-k tokens and the strongest main match of
    each aux model's top-k tokens. Each member's distribution is its own probability of every
    candidate, renormalised over U (UniTE fills a candidate missing from a member's top-k with that
    member's own logit): the main model's softmax over U; for an aux model, the mass its full
    distribution projects onto each candidate (Σ_a S[a, u]·p(a)), renormalised. With one shared
    vocabulary (identity alignment) both are exactly UniTE's softmax over U of each member's logits.
    """
    main = logits[0].float()
    batch, device = main.shape[0], main.device
    in_union = torch.zeros(batch, main_vocab, dtype=torch.bool, device=device)
    in_union.scatter_(1, main.topk(min(k, main_vocab), dim=-1).indices, True)
    unmapped = []
    for lg, proj in zip(logits[1:], projections):
        q, qids = topk_probs(lg, k)
        q, qids = q.to(device), qids.to(device)
        targets = proj.best_targets(qids)
        hit = targets >= 0
        in_union[torch.arange(batch, device=device)[:, None].expand_as(targets)[hit], targets[hit]] = True
        unmapped.append(proj.unmapped(q, qids))
    rows, cols = in_union.nonzero(as_tuple=True)
    dists = [torch.softmax(main.masked_fill(~in_union, -float("inf")), dim=-1)]
    for lg, proj in zip(logits[1:], projections):
        full = torch.softmax(lg.float().to(device), dim=-1)
        q = torch.zeros(batch, main_vocab, dtype=full.dtype, device=device)
        q[rows, cols] = proj.mass_onto(full, rows, cols)
        dists.append(q / q.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    return torch.stack(dists), _stack(unmapped, main)


def _stack(values: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(values) if values else like.new_zeros(0, like.shape[0])


CANDIDATES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"own": own, "union": union}
