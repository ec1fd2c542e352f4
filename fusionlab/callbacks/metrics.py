"""Representation metrics of the model being trained, at every checkpoint (or validation), on a fixed text set.

Any selection of the suite (:data:`fusionlab.metrics.suite.METRICS`). Each evaluation is one
no-grad pass of the trained model; where a metric needs the untrained twin (Diff-eRank), the twin
(same config, seed ``seed``) is built, evaluated and freed once, and its values are cached.
Logs ``<prefix>/<key>`` at the last selected layer and ``<prefix>/layer<i>/<key>`` at the others.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import lightning
from transformers import PreTrainedTokenizerBase

from fusionlab.callbacks.base import EvalCallback
from fusionlab.errors import FusionlabError
from fusionlab.metrics.suite import Measurements, MetricConfig, MetricsResult, measure, measure_twin, summarize, \
    tokenize
from fusionlab.tasks.texts import load_text_set

log = logging.getLogger(__name__)


class RepresentationMetricsCallback(EvalCallback):
    """Log representation metrics of ``pl_module.<model_attr>`` (a transformers model) during training.

    Args:
        texts: a JSONL path, a list of strings, or None for the text set shipped with fusionlab.
        tokenizer: a tokenizer object, an embedded model name / HF dir to load one from, or None to
            use ``pl_module.tokenizer``.
        trigger: ``validation`` (end of each validation epoch, sanity check excluded; values go through
            ``pl_module.log`` so ModelCheckpoint can monitor them) or ``checkpoint`` (each save,
            logged to the trainer's loggers and stored in the checkpoint).
        **settings: options of :class:`MetricConfig` (``metrics``, ``layers``, ``limit``, ``alpha`` ...).
    """

    checkpoint_key = "representation_metrics"

    def __init__(self, texts: str | Sequence[str] | None = None, tokenizer: str | PreTrainedTokenizerBase | None = None, model_attr: str = "model",
                 trigger: str = "checkpoint", prefix: str = "metrics", **settings: Any):
        super().__init__(trigger=trigger)
        if "layers" in settings and not isinstance(settings["layers"], (str, int)):
            settings["layers"] = list(settings["layers"])
        if "metrics" in settings and not isinstance(settings["metrics"], str):
            settings["metrics"] = list(settings["metrics"])
        try:
            self.settings = MetricConfig(texts=texts if isinstance(texts, str) else None, **settings)
        except TypeError as e:
            raise FusionlabError(f"{type(self).__name__}: {e}; valid options are "
                                 f"{sorted(MetricConfig.__dataclass_fields__)}.") from None
        self.texts = load_text_set(texts, field=self.settings.text_field, stop=self.settings.limit)
        self.tokenizer = tokenizer
        self.model_attr = model_attr
        self.prefix = prefix
        self._tokens: list[list[int]] | None = None
        self._n_skipped = 0
        self._pad_id = 0
        self.twin: Measurements | None = None  # the untrained twin's values, computed once

    def _token_ids(self, pl_module) -> list[list[int]]:
        if self._tokens is None:
            tok = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
            if tok is None:
                raise FusionlabError(f"{type(self).__name__} needs a tokenizer: pass tokenizer= (an embedded model "
                                     f"name or HF dir) or give {type(pl_module).__name__} a `tokenizer` attribute.")
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
        """The selected metrics of the module's model now (the untrained twin's values are cached)."""
        model = self.module_model(pl_module, self.model_attr)
        ids, s = self._token_ids(pl_module), self.settings
        trained = measure(model, ids, s, self._pad_id, desc="metrics")
        if s.twin_metrics and self.twin is None:
            params = next(model.parameters())
            self.twin = measure_twin(model.config, ids, s, self._pad_id, params.dtype, params.device)
        result = MetricsResult(s.metrics, trained, self.twin, summarize(trained, self.twin, s), len(ids),
                               self._n_skipped)
        return {k: float(v) for k, v in result.flat(f"{self.prefix}/").items()
                if not k.endswith(("/layer", "/n_texts", "/n_skipped"))}

    def evaluate(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> dict[str, float]:
        return self.compute(pl_module)
