"""Diff-eRank of the model being trained, at every checkpoint (or validation), on a fixed text set.

The untrained twin (same config, seed ``seed``) is built once, evaluated once and freed: its
entropies are cached, so each later evaluation costs one no-grad pass of the trained model.
Logs ``diff_erank/erank_trained``, ``diff_erank/erank_untrained``, ``diff_erank/diff_erank``
(the ``average`` given) and the ``_geo`` / ``_arith`` variants.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning
import torch

from fusionlab.callbacks.base import EvalCallback, callback_texts

from fusionlab.errors import FusionlabError
from fusionlab.metrics.diff_erank import (DiffERankResult, DiffERankSettings, model_entropies, tokenize,
                                          untrained_entropies)

log = logging.getLogger(__name__)


class DiffERankCallback(EvalCallback):
    """Log the Diff-eRank of ``pl_module.<model_attr>`` (a transformers model) during training.

    Args:
        texts: a JSONL path, a list of strings, or None for the text set shipped with fusionlab.
        tokenizer: a tokenizer object, an embedded model name / HF dir to load one from, or None to
            use ``pl_module.tokenizer``.
        trigger: ``validation`` (end of each validation epoch, sanity check excluded; values go through
            ``pl_module.log`` so ModelCheckpoint can monitor them) or ``checkpoint`` (each save,
            logged to the trainer's loggers and stored in the checkpoint).
    """

    def __init__(self, texts: str | Sequence[str] | None = None, text_field: str = "text", limit: int | None = 16,
                 layers: Any = "last", batch_size: int = 8, max_length: int = 256, average: str = "geometric",
                 seed: int = 0, tokenizer: Any = None, model_attr: str = "model", trigger: str = "checkpoint",
                 prefix: str = "diff_erank"):
        super().__init__(trigger=trigger)
        self.settings = DiffERankSettings.from_dict(dict(
            layers=layers if isinstance(layers, (str, int)) else list(layers), batch_size=batch_size,
            max_length=max_length, average=average, seed=seed, limit=limit, text_field=text_field,
            texts=texts if isinstance(texts, str) or texts is None else None))
        self.texts = callback_texts(texts, text_field, limit, "DiffERankCallback")
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.prefix = prefix
        self._tokens: list[list[int]] | None = None
        self._n_skipped = 0
        self._untrained: torch.Tensor | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _model(self, pl_module):
        return self.module_model(pl_module, self.model_attr)

    def _token_ids(self, pl_module) -> list[list[int]]:
        if self._tokens is None:
            tok = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
            if tok is None:
                raise FusionlabError("DiffERankCallback needs a tokenizer: pass tokenizer= (an embedded model name or "
                                     f"HF dir) or give {type(pl_module).__name__} a `tokenizer` attribute.")
            if isinstance(tok, str):
                from fusionlab.models import EMBEDDED_MODELS, ModelSpec, load_tokenizer

                tok = load_tokenizer(ModelSpec(name=tok, source="embedded" if tok in EMBEDDED_MODELS else "hf",
                                               path=tok))
            self.tokenizer = tok
            self._pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
            self._tokens, self._n_skipped = tokenize(tok, self.texts, self.settings.max_length,
                                                     self.settings.add_special_tokens)
        return self._tokens

    def compute(self, pl_module) -> dict[str, float]:
        """Diff-eRank of the module's model now; the untrained twin's entropies are computed once."""
        model = self._model(pl_module)
        ids = self._token_ids(pl_module)
        s = self.settings
        layers, trained = model_entropies(model, ids, s.layers, s.batch_size, self._pad_id, desc="eRank")
        if self._untrained is None:
            params = next(model.parameters())
            self._untrained = untrained_entropies(model.config, ids, layers, s, self._pad_id, params.dtype, params.device)
        result = DiffERankResult(layers=layers, trained=trained, untrained=self._untrained, n_skipped=self._n_skipped)
        metrics = {k: float(v) for k, v in result.metrics(f"{self.prefix}/", s.average).items()
                   if not k.endswith(("/layer", "/n_texts", "/n_skipped"))}
        if len(layers) > 1:
            for k, layer in enumerate(layers[:-1]):
                metrics[f"{self.prefix}/layer{layer}/diff_erank"] = result.layer_summary(k)[
                    "diff_erank_geo" if s.average == "geometric" else "diff_erank_arith"]
        return metrics

    checkpoint_key = "diff_erank"

    def evaluate(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> dict[str, float]:
        return self.compute(pl_module)
