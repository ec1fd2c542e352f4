"""Gates: at which decoding steps to ensemble at all (selective ensembling, EVA's successors).

A gate returns, per batch row, whether this step is ensembled (True) or follows the main model
alone (False). Its parameters say what it needs, read from its signature:

- ``main_probs`` (B, k): the main model's top-k probabilities, descending. A gate that needs only
  these is evaluated before any aux model runs, so a step where no row fires skips the aux models'
  forward passes altogether (they catch up on the skipped tokens in one forward when next needed).
- ``dists`` (M, B, V): every member's distribution in the main vocabulary (after the aux forwards).
- ``threshold``: ``ensemble.gate_threshold`` (the signature's default when the config leaves it null).

A gate with no parameter fires at every step: plain EVA.
"""
from __future__ import annotations

from typing import Callable

import torch

from fusionlab.ensemble.combine import takes


def always() -> None:
    """Ensemble every step (EVA, UniTE): no gate."""
    return None


def confidence(main_probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Ensemble only where the main model's top-1 probability is at most ``threshold``.

    GaC's threshold gate (Yu et al., EMNLP 2024 Findings: the primary model's token is emitted when
    its probability exceeds the threshold, reportedly 0.5 in the paper); SAFE (Yun et al., ICLR 2026)
    likewise ensembles only at uncertain positions. ``threshold=0``: never (the main model alone);
    ``threshold=1``: every step (plain EVA).
    """
    return main_probs[:, 0] <= threshold


def disagree(dists: torch.Tensor) -> torch.Tensor:
    """Ensemble only where some member's top-1 token differs from the main model's.

    SAFE's consensus skip: where every member agrees on the top-1 token, any convex combination of
    their distributions has the same argmax, so skipping changes nothing under greedy decoding; the
    fired share shows how often the members actually disagree.
    """
    top1 = dists.argmax(dim=-1)  # (M, B)
    return (top1 != top1[:1]).any(dim=0)


GATES: dict[str, Callable[..., torch.Tensor | None]] = {"always": always, "confidence": confidence,
                                                       "disagree": disagree}


def needs_members(gate: Callable) -> bool:
    """Whether ``gate`` reads the aux models' distributions (else it decides before they run)."""
    return takes(gate, "dists")
