"""The one place that decides when an evaluation callback runs and where its numbers go."""
from __future__ import annotations

from typing import Any

import lightning
import torch

from fusionlab.errors import FusionlabError

TRIGGERS = ("checkpoint", "validation")


class EvalCallback(lightning.Callback):
    """Run :meth:`evaluate` at each checkpoint save or at the end of each validation epoch.

    ``trigger: checkpoint`` (the default: the distillation trainer has no validation loop) logs the
    metrics to the trainer's loggers at the current step and stores them in the ``.ckpt`` under
    :attr:`checkpoint_key`; ``trigger: validation`` logs them through ``pl_module.log`` so that
    ModelCheckpoint can monitor them. With ``rank_zero_only`` only global rank zero evaluates
    (for work that writes files); otherwise every rank evaluates and validation logs are synced.
    """

    checkpoint_key = "eval"

    def __init__(self, trigger: str = "checkpoint", rank_zero_only: bool = False):
        if trigger not in TRIGGERS:
            raise FusionlabError(f"{type(self).__name__} trigger={trigger!r}: use one of {TRIGGERS}.")
        self.trigger = trigger
        self.rank_zero_only = rank_zero_only
        self.last_metrics: dict[str, float] = {}

    def evaluate(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> dict[str, float]:
        raise NotImplementedError

    def module_model(self, pl_module, attr: str, need_save: bool = False):
        """The transformers model at ``pl_module.<attr>``, or a clear error naming the attribute."""
        model = getattr(pl_module, attr, None)
        if not isinstance(model, torch.nn.Module) or (need_save and not hasattr(model, "save_pretrained")):
            raise FusionlabError(f"{type(self).__name__} needs the transformers model at pl_module.{attr}; "
                                 f"{type(pl_module).__name__} has none. Set model_attr to the right attribute.")
        return model

    def checkpoint_payload(self, metrics: dict[str, float]) -> dict[str, Any]:
        """What goes into the checkpoint under :attr:`checkpoint_key` (the metrics, by default)."""
        return dict(metrics)

    def _skip(self, trainer: "lightning.Trainer", trigger: str) -> bool:
        return self.trigger != trigger or (self.rank_zero_only and not trainer.is_global_zero)

    def on_validation_epoch_end(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> None:
        if self._skip(trainer, "validation") or trainer.sanity_checking:
            return
        self.last_metrics = self.evaluate(trainer, pl_module)
        for key, value in self.last_metrics.items():
            pl_module.log(key, float(value), on_step=False, on_epoch=True,
                          sync_dist=not self.rank_zero_only, rank_zero_only=self.rank_zero_only)

    def on_save_checkpoint(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule",
                           checkpoint: dict[str, Any]) -> None:
        if self._skip(trainer, "checkpoint"):
            return
        self.last_metrics = self.evaluate(trainer, pl_module)
        checkpoint.setdefault(self.checkpoint_key, {}).update(self.checkpoint_payload(self.last_metrics))
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last_metrics, step=trainer.global_step)
