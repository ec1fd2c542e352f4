"""Held-out CE / perplexity of the model being trained, at every checkpoint: the learning curve of the number
a distill run is judged on, by the end-of-fit scoring itself (:class:`fusionlab.distill.evaluation.HeldoutScores`).

The fit attaches what to score as ``pl_module.heldout`` (a :class:`~fusionlab.distill.evaluation.HeldoutSet`:
the held-out conversations, ``distill.eval`` and the model's column — ``fused``, ``clm`` for the CLM twin,
``sft`` in implicit fusion), so a checkpoint's ``heldout/ce/fused`` is the end-of-fit ``heldout/ce/fused``
of a fit stopped there. Opt-in (``callbacks=[default,heldout_eval]``): each evaluation is a forward pass over
every held-out conversation, a few training steps' worth of compute.
"""
from __future__ import annotations

import dataclasses

import lightning

from fusionlab.callbacks.base import EvalCallback
from fusionlab.errors import FusionlabError


class HeldoutEval(EvalCallback):
    """Log ``<split>/ce/<name>`` (+ ``_low``/``_high``), ``<split>/ppl/<name>`` and ``<split>/conversations`` at
    each checkpoint (``trigger: checkpoint``) or validation end, and store them in the ``.ckpt`` under ``heldout``.

    Args:
        task: also score ``distill.eval.task`` by generation each time (as the end of the fit does); costly.
        model_attr: the transformers model is ``pl_module.<model_attr>``.
    """

    checkpoint_key = "heldout"

    def __init__(self, trigger: str = "checkpoint", task: bool = False, model_attr: str = "model"):
        super().__init__(trigger=trigger, rank_zero_only=True)  # as the end-of-fit scores: global rank zero
        self.task = task
        self.model_attr = model_attr

    def setup(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule", stage: str) -> None:
        if getattr(pl_module, "heldout", None) is None:  # before the first step, not at the first checkpoint
            raise FusionlabError(f"The heldout_eval callback scores the held-out set a distill fit attaches as "
                                 f"pl_module.heldout; {type(pl_module).__name__} has none. Use it with job=distill "
                                 "(or fusechat_merge), or drop it from callbacks.")

    def evaluate(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> dict[str, float]:
        from fusionlab.distill.evaluation import HeldoutScores

        held = pl_module.heldout
        config = held.config if self.task else dataclasses.replace(held.config, task=None)
        scores = HeldoutScores(held.split)
        scores.score(held.name, self.module_model(pl_module, self.model_attr), pl_module.tokenizer, held.texts,
                     config, held.use_chat_template, held.seed)
        return {k: float(v) for k, v in scores.metrics(held.seed).items()}
