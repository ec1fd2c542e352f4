"""Lightning callback: EVA-ensemble score of the model being trained, at checkpoints or validation.

Reuses :func:`~fusionlab.ensemble.evaluate_ensemble` (the ``ensemble`` job's evaluation) with the
module's current model as the main model and fixed aux models (alignments built once per main
lm_head, cached on disk), on a few task examples.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from fusionlab.callbacks.base import EvalCallback
from fusionlab.ensemble import DecodingOptions, Member, align_members, evaluate_ensemble
from fusionlab.models import cache_dir, load_model
from fusionlab.tasks import get_task, load_examples

log = logging.getLogger(__name__)


class EvaEvalCallback(EvalCallback):
    """EVA-ensemble score of the model being trained (main) with fixed aux models on a few task examples.

    Runs at each checkpoint (default) or validation end (``trigger``); logs ``eva_eval/<metric>``.
    The aux models load once; the main's alignment is rebuilt whenever its lm_head changed
    (the cache key hashes it), so ``align_method: exact`` is the cheap default. ``decoder`` holds
    :class:`~fusionlab.ensemble.DecodingOptions` fields, checked when the callback is built.
    """

    checkpoint_key = "eva_eval"

    def __init__(self, task: str = "addsub", limit: int = 4, aux: dict[str, dict[str, Any]] | None = None,
                 align_method: str = "exact", align_params: dict[str, Any] | None = None, max_new_tokens: int = 32,
                 main_use_chat_template: bool = True, decoder: dict[str, Any] | None = None,
                 cache_dir: str | None = None, trigger: str = "checkpoint"):
        super().__init__(trigger=trigger)
        self.task, self.limit, self.aux_specs = task, limit, aux or {}
        self.metric = get_task(task).metric
        self.align_method, self.align_params = align_method, align_params or {}
        self.max_new_tokens = max_new_tokens
        self.main_use_chat_template = main_use_chat_template
        self.options = DecodingOptions(**(decoder or {}))
        self.cache_dir = cache_dir  # alignment cache; None: $FUSIONLAB_CACHE/align
        self._aux: list[Member] | None = None

    def _main(self, pl_module) -> Member:
        model = getattr(pl_module, "model", pl_module)
        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise AttributeError("EvaEvalCallback needs pl_module.tokenizer (the main model's tokenizer)")
        return Member("main", model, tok, self.main_use_chat_template)

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        main = self._main(pl_module)
        was_training = main.model.training
        main.model.eval()
        try:
            if self._aux is None:  # fixed for the whole fit: aux models and examples
                self._aux = [Member(n, *load_model({"name": n, **s}), s.get("use_chat_template", True))
                             for n, s in self.aux_specs.items()]
                self._examples = load_examples(self.task, limit=self.limit)
            # the main model changes while training: its alignment key (lm_head hash) changes too
            alignments = align_members((main.model, main.tokenizer), [(a.model, a.tokenizer) for a in self._aux],
                                       self.align_method, self.align_params, self.cache_dir or cache_dir() / "align")
            report = evaluate_ensemble([main, *self._aux], alignments, self.task, self._examples, self.options,
                                       self.max_new_tokens, batch_size=len(self._examples), eval_members=False)
        finally:
            main.model.train(was_training)
        value = float(report.metrics[f"ensemble_{self.metric}"])
        log.info("EVA eval at step %d: %s=%.4f", trainer.global_step, self.metric, value)
        return {f"eva_eval/{self.metric}": value}
