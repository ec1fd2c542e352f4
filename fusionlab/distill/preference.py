"""Preference optimisation of the pivot on chosen-vs-rejected responses: DPO and WRPO (FuseChat-3.0).

Implicit fusion (:mod:`fusionlab.distill.implicit`) ends here: after SFT on the best responses the
pivot is trained to prefer a better response over a worse one to the same prompt, against a frozen
reference (the SFT model). With r(y) = Σ over response tokens of log π_θ(y_t) − log π_ref(y_t)
(prompt tokens masked; divided by the response length when ``length_normalized``, as LN-DPO):

- DPO:  L = −log σ(β·[r(y_w) − r(y_l)])
- WRPO: L = −log σ(β·[α·r(y_ws) + (1−α)·r(y_wt) − r(y_l)]), y_ws the best *source* response,
  y_wt the best *target* (pivot) response, α rising linearly from 0 to ``alpha`` over the fit
  (SLIT-AI/WRPO ``is_dynamic: true``) or constant. α = 0 is DPO on (y_wt, y_l).

The reference model is held outside the module's parameters (not trained, not checkpointed).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from fusionlab.distill.module import StepThroughput
from fusionlab.errors import FusionlabError

PREFERENCE_LOSSES = ("dpo", "wrpo")
ALPHA_SCHEDULES = ("linear", "constant")


def response_logps(logits: torch.Tensor, labels: torch.Tensor, length_normalized: bool = False) -> torch.Tensor:
    """[B] summed (or mean) log-probability of the labelled tokens; labels -100 are masked (prompt, padding)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nxt = labels[:, 1:]
    mask = (nxt != -100).float()
    tok = logp.gather(-1, nxt.clamp_min(0)[..., None]).squeeze(-1) * mask
    total = tok.sum(-1)
    return total / mask.sum(-1).clamp_min(1.0) if length_normalized else total


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, per-pair margin β·[r_w − r_l]) of DPO (Rafailov et al. 2023, sigmoid form)."""
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def wrpo_loss(policy_source: torch.Tensor, policy_target: torch.Tensor, policy_rejected: torch.Tensor,
              ref_source: torch.Tensor, ref_target: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
              alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss, margin) of WRPO: the chosen reward is α·r(y_ws) + (1−α)·r(y_wt)."""
    chosen = alpha * (policy_source - ref_source) + (1.0 - alpha) * (policy_target - ref_target)
    margin = beta * (chosen - (policy_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin


def wrpo_alpha(step: int, total_steps: int, alpha: float, schedule: str = "linear") -> float:
    """α at optimizer step ``step`` (0-based): linear from 0 at the first step to ``alpha`` at the last."""
    if schedule == "constant":
        return alpha
    return alpha * min(step, max(total_steps - 1, 1)) / max(total_steps - 1, 1)


def check_preference_options(loss: str, beta: float, alpha: float, alpha_schedule: str) -> None:
    if loss not in PREFERENCE_LOSSES:
        raise FusionlabError(f"Unknown distill.implicit.loss {loss!r}; use one of {list(PREFERENCE_LOSSES)}.")
    if not beta > 0:
        raise FusionlabError(f"distill.implicit.beta={beta} must be > 0 (the DPO/WRPO inverse temperature).")
    if not 0.0 <= alpha <= 1.0:
        raise FusionlabError(f"distill.implicit.alpha={alpha} must lie in [0, 1] (WRPO's weight of the source "
                             "response).")
    if alpha_schedule not in ALPHA_SCHEDULES:
        raise FusionlabError(f"Unknown distill.implicit.alpha_schedule {alpha_schedule!r}; use one of "
                             f"{list(ALPHA_SCHEDULES)}.")


# ------------------------------------------------------------------------------------------- data
ROLES = ("chosen", "rejected", "source")  # source: WRPO's y_ws (absent for DPO)


class PreferenceDataset(Dataset):
    """Pairs ``{"id", "chosen": {input_ids, assistant}, "rejected": {...}[, "source": {...}]}``."""

    def __init__(self, pairs: Sequence[dict[str, Any]]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.pairs[i]


def collate_pairs(samples: list[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """All roles of all pairs padded to one length: ``input_ids``/``attention_mask``/``labels`` [R·B, L],
    role r of pair b at row r·B + b (one forward pass for the policy, one for the reference)."""
    roles = [r for r in ROLES if r in samples[0]]
    seqs = [s[r] for r in roles for s in samples]
    L_ = max(len(x["input_ids"]) for x in seqs)
    n = len(seqs)
    out = {"input_ids": torch.full((n, L_), pad_id, dtype=torch.long),
           "attention_mask": torch.zeros(n, L_, dtype=torch.long),
           "labels": torch.full((n, L_), -100, dtype=torch.long)}
    for row, x in enumerate(seqs):
        ids = torch.as_tensor(np.asarray(x["input_ids"], dtype=np.int64))
        k = len(ids)
        out["input_ids"][row, :k] = ids
        out["attention_mask"][row, :k] = 1
        out["labels"][row, :k] = torch.where(torch.as_tensor(np.asarray(x["assistant"], dtype=bool)), ids, -100)
    out["n_roles"] = torch.tensor(len(roles))
    return out


class PreferenceDataModule(L.LightningDataModule):
    """Seeded, resumable shuffle over preference pairs (the sampler of :mod:`fusionlab.distill.data`)."""

    def __init__(self, pairs: Sequence[dict[str, Any]], batch_size: int = 2, seed: int = 0, pad_id: int = 0):
        super().__init__()
        if not pairs:
            raise FusionlabError("No preference pairs: every prompt's responses scored the same (or none was "
                                 "sampled); raise distill.implicit.samples or use more prompts.")
        self.train = PreferenceDataset(pairs)
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self.sampler = None

    def train_dataloader(self):
        from fusionlab.distill.data import ResumableLoader, SeededShuffle

        self.sampler = SeededShuffle(len(self.train), self.seed)
        return ResumableLoader(self.train, batch_size=self.batch_size, sampler=self.sampler,
                               collate_fn=lambda s: collate_pairs(s, self.pad_id))

    def mark_consumed(self, n: int) -> None:
        if self.sampler is not None:
            self.sampler.consumed += n


# ------------------------------------------------------------------------------------------- module
class PreferenceModule(StepThroughput, L.LightningModule):
    """The pivot trained with DPO or WRPO against a frozen reference model."""

    def __init__(self, model: torch.nn.Module, reference: torch.nn.Module,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, scheduler: Callable[..., Any] | None = None,
                 loss: str = "dpo", beta: float = 0.1, alpha: float = 0.1, alpha_schedule: str = "linear",
                 length_normalized: bool = False):
        super().__init__()
        check_preference_options(loss, beta, alpha, alpha_schedule)
        self.model = model
        reference.eval().requires_grad_(False)
        self._reference = [reference]  # a list: not a sub-module, so neither trained nor saved in checkpoints
        self.optimizer_fn, self.scheduler_fn = optimizer, scheduler
        self.loss, self.beta, self.alpha, self.alpha_schedule = loss, beta, alpha, alpha_schedule
        self.length_normalized = length_normalized
        self.save_hyperparameters(ignore=["model", "reference", "optimizer", "scheduler"])

    @property
    def reference(self) -> torch.nn.Module:
        return self._reference[0]

    def on_fit_start(self) -> None:
        self.reference.to(self.device)

    def current_alpha(self) -> float:
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return wrpo_alpha(int(self.global_step), total, self.alpha, self.alpha_schedule)

    def preference_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy = response_logps(self.model(**inputs).logits, batch["labels"], self.length_normalized)
        with torch.no_grad():
            ref = response_logps(self.reference(**inputs).logits, batch["labels"], self.length_normalized)
        parts_p, parts_r = policy.chunk(int(batch["n_roles"])), ref.chunk(int(batch["n_roles"]))
        if self.loss == "wrpo":
            if len(parts_p) != 3:
                raise FusionlabError("WRPO needs a source response per pair (chosen, rejected and source); the "
                                     "pairs were built for DPO.")
            alpha = self.current_alpha()
            loss, margin = wrpo_loss(parts_p[2], parts_p[0], parts_p[1], parts_r[2], parts_r[0], parts_r[1],
                                     self.beta, alpha)
        else:
            alpha = 0.0
            loss, margin = dpo_loss(parts_p[0], parts_p[1], parts_r[0], parts_r[1], self.beta)
        return {"loss": loss, "margin": margin.mean(), "accuracy": (margin > 0).float().mean(),
                "alpha": torch.tensor(alpha)}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.preference_loss(batch)
        pairs = batch["input_ids"].shape[0] // int(batch["n_roles"])
        self.count_tokens(int(batch["attention_mask"].sum()))
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "mark_consumed"):
            dm.mark_consumed(pairs)
        self.log_dict({f"pref/{k}": v for k, v in out.items()}, prog_bar=True, batch_size=pairs)
        return out["loss"]

    def configure_optimizers(self):
        from fusionlab.distill.module import optimizers

        return optimizers(self, self.model.parameters(), self.optimizer_fn, self.scheduler_fn, default_lr=1e-6)
