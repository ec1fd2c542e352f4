"""Lightning callback: EVA-ensemble accuracy of the model being trained, at checkpoints or validation.

Reuses :class:`~fusionlab.ensemble.EvaDecoder` with the module's current model as the main
model and fixed aux models (alignments built once, cached on disk), on a few task examples.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from fusionlab.callbacks.base import EvalCallback
from fusionlab.ensemble import EvaDecoder, align_members
from fusionlab.models import ModelSpec, cache_dir, load_model
from fusionlab.tasks import load_examples, score, task_prompts

log = logging.getLogger(__name__)


class EvaEvalCallback(EvalCallback):
    """EVA-ensemble score of the model being trained (main) with fixed aux models on a few task examples.

    Runs at each checkpoint (default) or validation end (``trigger``); logs ``eva_eval/<metric>``.
    The aux models load once; the main's alignment is rebuilt whenever its lm_head changed
    (the cache key hashes it), so ``align_method: exact`` is the cheap default.
    """

    checkpoint_key = "eva_eval"

    def __init__(self, task: str = "addsub", limit: int = 4, aux: dict[str, dict[str, Any]] | None = None,
                 align_method: str = "exact", align_params: dict[str, Any] | None = None, max_new_tokens: int = 32,
                 main_use_chat_template: bool = True, decoder: dict[str, Any] | None = None,
                 cache_dir: str | None = None, trigger: str = "checkpoint"):
        super().__init__(trigger=trigger)
        self.task, self.limit, self.aux_specs = task, limit, aux or {}
        self.align_method, self.align_params = align_method, align_params or {}
        self.max_new_tokens = max_new_tokens
        self.main_use_chat_template, self.decoder_kwargs = main_use_chat_template, decoder or {}
        self.cache_dir = cache_dir  # alignment cache; None: $FUSIONLAB_CACHE/align
        self._aux = None

    def _main(self, pl_module):
        model = getattr(pl_module, "model", pl_module)
        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise AttributeError("EvaEvalCallback needs pl_module.tokenizer (the main model's tokenizer)")
        return model, tok

    @torch.no_grad()
    def evaluate(self, trainer, pl_module) -> dict[str, float]:
        model, tok = self._main(pl_module)
        was_training = model.training
        model.eval()
        try:
            if self._aux is None:  # fixed for the whole fit: aux models, examples, aux prompts
                self._aux = [load_model(ModelSpec.from_dict({"name": n, **s})) for n, s in self.aux_specs.items()]
                self._examples = load_examples(self.task, limit=self.limit)
                self._aux_prompts = [task_prompts(self.task, self._examples, t, s.get("use_chat_template", True))
                                     for (_, t), s in zip(self._aux, self.aux_specs.values())]
            # the main model changes while training: its alignment key (lm_head hash) changes too
            alignments = align_members((model, tok), self._aux, self.align_method, self.align_params,
                                       self.cache_dir or cache_dir() / "align")
            examples = self._examples
            prompts = [task_prompts(self.task, examples, tok, self.main_use_chat_template)] + self._aux_prompts
            out = EvaDecoder((model, tok), self._aux, alignments, **self.decoder_kwargs).generate(
                prompts, max_new_tokens=self.max_new_tokens)
            scores, _ = score(self.task, out.texts, examples)
        finally:
            model.train(was_training)
        log.info("EVA eval at step %d: %s", trainer.global_step, scores)
        return {f"eva_eval/{k}": float(v) for k, v in scores.items() if isinstance(v, (int, float)) and k != "n"}
