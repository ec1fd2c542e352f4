"""Lightning callback: EVA-ensemble accuracy of the model being trained, at validation time.

Reuses :class:`~fusionlab.ensemble.EvaDecoder` with the module's current model as the main
model and fixed aux models (alignments built once, cached on disk), on a few task examples.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from fusionlab.align import align
from fusionlab.ensemble import EvaDecoder
from fusionlab.ensemble.decoder import eos_ids
from fusionlab.models import ModelSpec, cache_dir, load_model
from fusionlab.models.chat import render_prompt
from fusionlab.tasks import build_messages, load_examples, score

log = logging.getLogger(__name__)


class EvaEvalCallback(Callback):
    def __init__(self, task: str = "addsub", limit: int = 4, aux: dict[str, dict[str, Any]] | None = None,
                 align_method: str = "exact", align_params: dict[str, Any] | None = None, max_new_tokens: int = 32,
                 every_n_epochs: int = 1, main_use_chat_template: bool = True, decoder: dict[str, Any] | None = None,
                 cache_dir: str | None = None):
        self.task, self.limit, self.aux_specs = task, limit, aux or {}
        self.align_method, self.align_params = align_method, align_params or {}
        self.max_new_tokens, self.every_n_epochs = max_new_tokens, every_n_epochs
        self.main_use_chat_template, self.decoder_kwargs = main_use_chat_template, decoder or {}
        self.cache_dir = cache_dir  # alignment cache; None: $FUSIONLAB_CACHE/align
        self._aux = None
        self._alignments = None

    def _main(self, pl_module):
        model = getattr(pl_module, "model", pl_module)
        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise AttributeError("EvaEvalCallback needs pl_module.tokenizer (the main model's tokenizer)")
        return model, tok

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        model, tok = self._main(pl_module)
        was_training = model.training
        model.eval()
        try:
            if self._aux is None:
                self._aux = [load_model(ModelSpec.from_dict({"name": n, **s})) for n, s in self.aux_specs.items()]
            # the main model changes while training: its alignment key (lm_head hash) changes too
            alignments = [align(m, t, model, tok, self.align_method, cache_dir=self.cache_dir or cache_dir() / "align",
                                aux_eos_ids=sorted(eos_ids(m, t)), **self.align_params) for m, t in self._aux]
            examples = load_examples(self.task, limit=self.limit)
            specs = [self.main_use_chat_template] + [s.get("use_chat_template", True) for s in self.aux_specs.values()]
            toks = [tok] + [t for _, t in self._aux]
            prompts = []
            for t, chat in zip(toks, specs):
                rendered = []
                for ex in examples:
                    messages, prefix = build_messages(self.task, ex)
                    rendered.append(render_prompt(t, messages, use_chat_template=chat, assistant_prefix=prefix))
                prompts.append(rendered)
            out = EvaDecoder((model, tok), self._aux, alignments, **self.decoder_kwargs).generate(
                prompts, max_new_tokens=self.max_new_tokens)
            metrics, _ = score(self.task, out.texts, examples)
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "n":
                    pl_module.log(f"eva_eval/{k}", float(v), sync_dist=False)
            log.info("EVA eval at epoch %d: %s", trainer.current_epoch, metrics)
        finally:
            model.train(was_training)
