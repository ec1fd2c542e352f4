"""FuseLightningModule: a causal LM trained on λ·CLM + (1−λ)·fusion over assistant tokens.

The optimizer and scheduler arrive as callables (Hydra ``_partial_`` configs):
``optimizer(params) -> Optimizer`` and ``scheduler(optimizer[, total_steps=...]) -> LRScheduler``
(``total_steps`` is passed when the callable accepts it), stepped every optimizer step.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from typing import Any, Callable

import lightning as L
import torch

from fusionlab.distill.loss import check_loss_options, fusion_loss
from fusionlab.errors import FusionlabError


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float = 0.03,
                  min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup for ``warmup_ratio`` of the steps, then cosine decay (FuseChat's schedule)."""
    total = max(int(total_steps), 1)
    warm = int(math.ceil(warmup_ratio * total))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(total - warm, 1))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_fingerprint(model: torch.nn.Module) -> str:
    """Architecture identity (config + parameter shapes): a checkpoint of another model must not load."""
    cfg = getattr(model, "config", None)
    cfg_d = cfg.to_dict() if cfg is not None else {}
    keep = {k: cfg_d.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                       "intermediate_size", "num_attention_heads", "num_key_value_heads")}
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    return hashlib.sha256(json.dumps([keep, shapes], default=str).encode()).hexdigest()[:16]


def optimizers(module: L.LightningModule, parameters, optimizer_fn: Callable | None, scheduler_fn: Callable | None,
               default_lr: float):
    """Lightning's ``configure_optimizers`` for our modules: the configured optimizer (AdamW at ``default_lr``
    if none) over the trainable parameters, and a per-step scheduler given the fit's total steps if it asks."""
    params = [p for p in parameters if p.requires_grad]
    opt = optimizer_fn(params) if optimizer_fn else torch.optim.AdamW(params, lr=default_lr)
    if scheduler_fn is None:
        return opt
    kwargs = {}
    if "total_steps" in inspect.signature(scheduler_fn).parameters:
        kwargs["total_steps"] = int(module.trainer.estimated_stepping_batches)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler_fn(opt, **kwargs), "interval": "step"}}


class StepThroughput:
    """Mixin for our LightningModules: the tokens and seconds of the training steps run IN THIS PROCESS.

    A resumed run restores ``tokens_seen`` (the run's total) from its checkpoint, but its clock starts at
    zero, so throughput must divide this process's tokens by this process's step time — else a resume
    that runs no step reports its restored total over ~0 s. Step time is forward + backward + optimizer
    step only: the callbacks' batch-end hooks (checkpoint saving, evaluations) run before the module's
    ``on_train_batch_end`` and are excluded.
    """

    tokens_seen = 0  # all steps of the run; FuseLightningModule's checkpoint hooks restore it on resume
    tokens_this_run = 0
    steps_this_run = 0
    step_seconds = 0.0
    _t0, _t_done = 0.0, None

    def count_tokens(self, n: int) -> None:
        self.tokens_seen += n
        self.tokens_this_run += n

    @property
    def tokens_per_s(self) -> float:
        """This process's tokens per second of step time; 0.0 when no step ran here."""
        return self.tokens_this_run / self.step_seconds if self.steps_this_run and self.step_seconds > 0 else 0.0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._t0, self._t_done = time.perf_counter(), None

    def on_after_backward(self) -> None:
        self._t_done = time.perf_counter()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._t_done = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._t_done is not None:
            self.step_seconds += self._t_done - self._t0
            self.steps_this_run += 1


def throughput_metrics(module: StepThroughput, prefix: str, world: int = 1) -> dict[str, Any]:
    """``<prefix>/tokens`` (the run's total, resumed steps included), ``<prefix>/tokens_this_run``,
    ``<prefix>/steps_this_run``, ``<prefix>/step_seconds`` and ``<prefix>/tokens_per_s`` (this process's
    tokens over its step seconds, all ranks; 0.0 when no step ran here)."""
    return {f"{prefix}/tokens": int(module.tokens_seen) * world,
            f"{prefix}/tokens_this_run": int(module.tokens_this_run) * world,
            f"{prefix}/steps_this_run": int(module.steps_this_run), f"{prefix}/step_seconds": module.step_seconds,
            f"{prefix}/tokens_per_s": module.tokens_per_s * world}


class FuseLightningModule(StepThroughput, L.LightningModule):
    def __init__(self, model: torch.nn.Module, optimizer: Callable[..., torch.optim.Optimizer] | None = None,
                 scheduler: Callable[..., Any] | None = None, lam: float = 0.9, temperature: float = 1.0,
                 loss_type: str = "ce", fusion_mode: str = "min_ce", lora: dict[str, Any] | None = None,
                 gradient_checkpointing: bool = False, log_prefix: str = ""):
        super().__init__()
        check_loss_options(lam, temperature, loss_type, fusion_mode)
        if gradient_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            if getattr(model, "config", None) is not None:
                model.config.use_cache = False
        if lora:
            from peft import LoraConfig, get_peft_model

            if gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
        self.model = model
        self.optimizer_fn = optimizer
        self.scheduler_fn = scheduler
        self.lam, self.temperature, self.loss_type, self.fusion_mode = lam, temperature, loss_type, fusion_mode
        self.fingerprint = model_fingerprint(model)
        self.log_prefix = log_prefix  # e.g. "baseline/": the CLM twin logs beside the fused run
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])

    def _step(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.lam == 1.0:  # plain CLM (the baseline twin): the fusion term weighs 0, so it is not computed
            labels = batch["labels"][:, 1:]
            clm = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                                    ignore_index=-100)
            return {"loss": clm, "clm": clm, "fusion": torch.zeros_like(clm), "tokens": (labels != -100).sum()}
        return fusion_loss(logits, batch["labels"], batch["target_ids"], batch["target_logits"], batch["ce"],
                           lam=self.lam, temperature=self.temperature, mode=self.fusion_mode, loss_type=self.loss_type)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._step(batch)
        self.count_tokens(int(batch["attention_mask"].sum()))
        bs = batch["input_ids"].shape[0]
        dm = getattr(self.trainer, "datamodule", None)
        if hasattr(dm, "mark_consumed"):
            dm.mark_consumed(bs)
        p = self.log_prefix
        self.log_dict({f"{p}train/loss": out["loss"], f"{p}train/clm": out["clm"], f"{p}train/fusion": out["fusion"]},
                      prog_bar=True, batch_size=bs, sync_dist=True)  # under DDP: the mean over ranks, not rank 0's
        return out["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._step(batch)
        bs = batch["input_ids"].shape[0]
        p = self.log_prefix
        self.log_dict({f"{p}val/loss": out["loss"], f"{p}val/clm": out["clm"], f"{p}val/fusion": out["fusion"]},
                      batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        return optimizers(self, self.parameters(), self.optimizer_fn, self.scheduler_fn, default_lr=5e-6)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["fusionlab"] = {"fingerprint": self.fingerprint, "tokens_seen": self.tokens_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info = checkpoint.get("fusionlab")
        if info is None or info.get("fingerprint") != self.fingerprint:
            raise FusionlabError(
                "The checkpoint to resume from was written for a different model or adapter setup "
                f"(fingerprint {None if info is None else info.get('fingerprint')} vs {self.fingerprint}); "
                "resume with the same model/lora settings, or start fresh (distill.resume=false or a new output dir).")
        self.tokens_seen = int(info.get("tokens_seen", 0))
