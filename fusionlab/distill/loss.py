"""The FuseChat / FuseLLM training loss, sparse in the vocabulary.

L = λ·CLM + (1−λ)·fusion, both averaged over assistant positions (position t counts when
label t+1 is not -100). Each candidate m (pivot = 0, then sources) gives a sparse target
P_m = softmax(topk_logits_m / T) over ≤k pivot ids; ``min_ce`` keeps, per sample, the
candidate with the lowest sequence CE (FuseChat pairwise / FuseLLM MinCE), ``avg_ce`` mixes
them with weights softmax(−CE) (FuseLLM AvgCE). The CE to the student,
−Σ_v P*(v)·log softmax(z)(v), only needs log-probs gathered at the ≤M·k target ids: no dense
[B, L, V] target is ever built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fusionlab.errors import FusionlabError

FUSION_MODES = ("min_ce", "avg_ce", "pivot")
LOSS_TYPES = ("ce", "kl")


def check_loss_options(lam: float, temperature: float, loss_type: str, fusion_mode: str) -> None:
    """The one check of the loss settings (the distill config and the LightningModule both run it)."""
    if fusion_mode not in FUSION_MODES:
        raise FusionlabError(f"Unknown distill.fusion_mode {fusion_mode!r}; use one of {list(FUSION_MODES)}.")
    if loss_type not in LOSS_TYPES:
        raise FusionlabError(f"Unknown distill.loss_type {loss_type!r}; use one of {list(LOSS_TYPES)}.")
    if not 0.0 <= lam <= 1.0:
        raise FusionlabError(f"distill.lam={lam} must lie in [0, 1] (L = lam·CLM + (1 − lam)·fusion).")
    if not temperature > 0:
        raise FusionlabError(f"distill.temperature={temperature} must be > 0 (targets are softmax(logits / T)).")


def candidate_weights(ce: torch.Tensor, mode: str) -> torch.Tensor:
    """[B, M] weights of each candidate distribution per sample."""
    if mode == "min_ce":
        return F.one_hot(ce.argmin(-1), ce.shape[-1]).to(ce.dtype)
    if mode == "avg_ce":
        return torch.softmax(-ce, dim=-1)
    if mode == "pivot":
        return F.one_hot(torch.zeros_like(ce[:, 0], dtype=torch.long), ce.shape[-1]).to(ce.dtype)
    raise ValueError(f"unknown fusion mode {mode!r}; use one of {FUSION_MODES}")


def sparse_targets(target_ids: torch.Tensor, target_logits: torch.Tensor, ce: torch.Tensor, mode: str,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs) [B, L, M·k] of the fused target; padding slots have id 0 and prob 0."""
    B, M, L, k = target_ids.shape
    valid = target_ids >= 0
    lg = torch.where(valid, target_logits.float() / temperature, torch.full_like(target_logits.float(), -torch.inf))
    p = torch.softmax(lg, dim=-1).nan_to_num(0.0)  # all-padding rows give NaN -> 0
    p = p * candidate_weights(ce.float(), mode)[:, :, None, None]
    ids = target_ids.clamp_min(0).permute(0, 2, 1, 3).reshape(B, L, M * k)
    return ids, p.permute(0, 2, 1, 3).reshape(B, L, M * k)


def _entropy(ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Σ p log p of a sparse distribution whose ids may repeat (merged first)."""
    s_ids, order = ids.sort(dim=-1)
    s_p = probs.gather(-1, order)
    first = torch.ones_like(s_ids, dtype=torch.bool)
    first[..., 1:] = s_ids[..., 1:] != s_ids[..., :-1]
    group = first.long().cumsum(-1) - 1
    merged = torch.zeros_like(s_p).scatter_add_(-1, group, s_p)
    return torch.where(merged > 0, merged * merged.clamp_min(1e-30).log(), torch.zeros_like(merged)).sum(-1)


def fusion_loss(logits: torch.Tensor, labels: torch.Tensor, target_ids: torch.Tensor, target_logits: torch.Tensor,
                ce: torch.Tensor, *, lam: float = 0.9, temperature: float = 1.0, mode: str = "min_ce",
                loss_type: str = "ce") -> dict[str, torch.Tensor]:
    """Loss terms for logits [B, L, V], labels [B, L] (-100 = ignore), targets [B, M, L, k], ce [B, M]."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; use one of {LOSS_TYPES}")
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # position t predicts token t+1
    nxt = labels[:, 1:]
    mask = (nxt != -100).float()
    n = mask.sum().clamp_min(1.0)
    clm_tok = -logp.gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1)
    ids, probs = sparse_targets(target_ids[:, :, :-1], target_logits[:, :, :-1], ce, mode, temperature)
    fuse_tok = -(probs * logp.gather(-1, ids)).sum(-1)
    if loss_type == "kl":
        fuse_tok = fuse_tok + _entropy(ids, probs)
    clm = (clm_tok * mask).sum() / n
    fusion = (fuse_tok * mask).sum() / n
    return {"loss": lam * clm + (1.0 - lam) * fusion, "clm": clm, "fusion": fusion, "tokens": mask.sum()}
