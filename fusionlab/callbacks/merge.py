"""Merge the model being trained at every checkpoint: a chat vector added to it, or a merge method.

At each checkpoint save (``trigger: checkpoint``; the distill trainer has no validation loop) or
validation end (``trigger: validation``), global rank zero exports ``pl_module.model`` (+ the
tokenizer at ``pl_module.tokenizer``) to a temporary HF dir and hands it to the merge library —
nothing is re-implemented here:

- ``mode: add`` (Chat Vector): trained + ratio·τ with :func:`fusionlab.merge.chat_vector.add`; τ is
  an extracted chat-vector dir (``chat_vector``), or is extracted once from ``chat_base`` and
  ``chat`` with :func:`fusionlab.merge.chat_vector.extract`.
- ``mode: merge``: :func:`fusionlab.merge.merge` with ``method`` (task_arithmetic, ties, sce, ...),
  ``base`` (default: the trained model's own starting weights, snapshotted once before training),
  the trained model (``model_parameters``) and any other ``models``.

The merged checkpoint is written atomically to ``<dirpath>/step<NNNNNN>`` (the newest ``keep_last``
are kept); its perplexity on a few shipped texts (and the trained and base models', for comparison)
goes to the trainer's loggers (``<prefix>/ppl_merged``, ``<prefix>/ppl_trained``, ``<prefix>/ppl_base``)
and into the checkpoint under ``"merge"`` (with ``<prefix>/output``, the merged dir).
"""
from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import lightning

from fusionlab.callbacks.base import EvalCallback

from fusionlab.errors import FusionlabError
from fusionlab.tasks.texts import load_text_set

log = logging.getLogger(__name__)

MODES = ("add", "merge")


class MergeCallback(EvalCallback):
    """Write ``merge(trained model)`` at every checkpoint and log its perplexity.

    Args:
        mode: ``add`` (chat vector) or ``merge`` (a merge method).
        method, base, parameters, model_parameters, models: the merge (``mode: merge``); ``base: null``
            = the model's weights before training (saved once to ``<dirpath>/base``); ``model_parameters``
            defaults to ``{weight: 1.0}`` for methods with a weight.
        chat_vector, chat_base, chat, ratio, skip_embed, special_tokens_map: the chat vector (``mode: add``).
        dtype: output dtype (``auto`` = the trained model's).
        dirpath: where merged checkpoints go (default ``<trainer.default_root_dir>/merged``).
        keep_last: how many merged step dirs to keep (``null`` = all).
        texts / text_field / limit / max_length / batch_size: the perplexity texts (JSONL path, a list of
            strings, or None for ``fusionlab/data/erank_texts.jsonl``).
        trigger: ``checkpoint`` or ``validation``.
    """

    def __init__(self, mode: str = "merge", method: str = "task_arithmetic", base: str | None = None,
                 parameters: dict[str, Any] | None = None, model_parameters: dict[str, Any] | None = None,
                 models: Sequence[Any] | None = None, chat_vector: str | None = None, chat_base: str | None = None,
                 chat: str | None = None, ratio: float = 1.0, skip_embed: bool = False,
                 special_tokens_map: dict[int, int] | None = None, dtype: str = "auto", dirpath: str | None = None,
                 keep_last: int | None = 1, texts: str | Sequence[str] | None = None, text_field: str = "text",
                 limit: int | None = 8, max_length: int = 128, batch_size: int = 4, model_attr: str = "model",
                 trigger: str = "checkpoint", prefix: str = "merge"):
        from fusionlab.merge import get_method

        if mode not in MODES:
            raise FusionlabError(f"MergeCallback mode={mode!r}: use 'add' (chat vector) or 'merge' (a merge method).")
        super().__init__(trigger=trigger, rank_zero_only=True)  # it writes files: rank zero only
        if mode == "add" and not chat_vector and not (chat_base and chat):
            raise FusionlabError("MergeCallback mode=add needs a chat vector: chat_vector=<dir extracted by "
                                 "fusionlab> or chat_base=<pre-trained model> and chat=<its chat fine-tune>.")
        if mode == "merge":
            m = get_method(method)  # unknown method or parameter: fail before training starts
            if model_parameters is None and "weight" in m.per_model:
                model_parameters = {"weight": 1.0}
            m.check_names(parameters, "MergeCallback parameters")
            m.check_names(model_parameters, "MergeCallback model_parameters", one_model=True)
        if keep_last is not None and int(keep_last) < 1:
            raise FusionlabError(f"MergeCallback keep_last={keep_last}: keep at least 1 (or null for all).")
        self.mode, self.method, self.base = mode, method, base
        self.parameters = dict(parameters or {})
        self.model_parameters = dict(model_parameters or {})
        self.models = [m if isinstance(m, dict) else {"model": str(m)} for m in (models or [])]
        self.chat_vector, self.chat_base, self.chat = chat_vector, chat_base, chat
        self.ratio, self.skip_embed = float(ratio), bool(skip_embed)
        self.special_tokens_map = {int(k): int(v) for k, v in (special_tokens_map or {}).items()} or None
        self.dtype, self.dirpath, self.keep_last = dtype, dirpath, keep_last
        self.texts = load_text_set(texts, field=text_field, stop=limit)
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.model_attr, self.prefix = model_attr, prefix
        self._base_dir: Path | None = None
        self._ppl_base: float | None = None
        self.last_output: Path | None = None

    # -- plumbing -------------------------------------------------------------------------------
    def _root(self, trainer) -> Path:
        return Path(self.dirpath or Path(trainer.default_root_dir) / "merged").expanduser()

    def _model(self, pl_module):
        return self.module_model(pl_module, self.model_attr, need_save=True)

    def _export(self, pl_module, out: Path) -> None:
        """The trained model as an HF dir (LoRA adapters merged into a copy; the trained module is untouched)."""
        model = self._model(pl_module)
        if hasattr(model, "merge_and_unload"):  # peft
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(out, safe_serialization=True)
        tok = getattr(pl_module, "tokenizer", None)
        if tok is None:
            raise FusionlabError(f"MergeCallback needs the tokenizer at pl_module.tokenizer ({type(pl_module).__name__} "
                                 "has none): the merged checkpoint must be loadable with its tokenizer.")
        tok.save_pretrained(out)

    def setup(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule", stage: str) -> None:
        """Check the strategy; snapshot the starting weights as the merge base (before any resume restores)."""
        if type(trainer.strategy).__name__ in ("FSDPStrategy", "DeepSpeedStrategy"):
            raise FusionlabError("MergeCallback exports pl_module.model from rank zero, which needs the full weights: "
                                 "use an unsharded strategy (cpu, gpu, ddp), or merge the exported model after "
                                 "training with +experiment=merge.")
        if self.mode != "merge" or self.base is not None or not trainer.is_global_zero:
            return
        snap = self._root(trainer) / "base"
        if not (snap / "config.json").exists():  # a resumed run keeps the first run's starting point
            from fusionlab.io import atomic_dir

            with atomic_dir(snap, overwrite=True) as tmp:
                self._export(pl_module, tmp)
        self._base_dir = snap

    def _base(self) -> str:
        return str(self._base_dir) if self.base is None else self.base

    def _vector(self, root: Path) -> str:
        if self.chat_vector:
            return self.chat_vector
        from fusionlab.merge import chat_vector as cv

        out = root / "chat_vector"
        if not (out / "chat_vector.json").exists() and not (out / "config.json").exists():
            cv.extract(self.chat_base, self.chat, out, skip_embed=self.skip_embed, overwrite=True, progress=False)
        return str(out)

    def merge_now(self, trainer, pl_module) -> dict[str, float]:
        """Export, merge, score; returns the metrics (rank zero only)."""
        from fusionlab.metrics.perplexity import perplexity

        root = self._root(trainer)
        root.mkdir(parents=True, exist_ok=True)
        out = root / f"step{trainer.global_step:06d}"
        from fusionlab.io import scratch_dir

        export = scratch_dir(root, "trained")  # a killed run's export is removed by the next one
        was_training = self._model(pl_module).training
        try:
            self._export(pl_module, export)
            if self.mode == "add":
                from fusionlab.merge import chat_vector as cv

                cv.add(str(export), [self._vector(root)], [self.ratio], out, skip_embed=self.skip_embed,
                       special_tokens_map=self.special_tokens_map, dtype=self.dtype, overwrite=True, progress=False)
            else:
                from fusionlab.merge import MergeConfig, merge

                models = [{"model": str(export), "parameters": self.model_parameters}, *self.models]
                merge(MergeConfig.from_dict({"method": self.method, "base": self._base(), "models": models,
                                             "parameters": self.parameters, "output": str(out), "dtype": self.dtype,
                                             "tokenizer_source": str(export), "overwrite": True, "progress": False}))
            metrics = {f"{self.prefix}/ppl_merged": perplexity(out, self.texts, self.max_length, self.batch_size),
                       f"{self.prefix}/ppl_trained": perplexity(export, self.texts, self.max_length, self.batch_size)}
        finally:
            shutil.rmtree(export, ignore_errors=True)
            self._model(pl_module).train(was_training)
        if self.mode == "merge":
            if self._ppl_base is None:
                self._ppl_base = perplexity(self._base(), self.texts, self.max_length, self.batch_size)
            metrics[f"{self.prefix}/ppl_base"] = self._ppl_base
        self._prune(root, keep=out)
        self.last_output = out
        log.info("Merged checkpoint %s: %s", out, metrics)
        return metrics

    def _prune(self, root: Path, keep: Path) -> None:
        if self.keep_last is None:
            return
        steps = sorted(p for p in root.glob("step[0-9]*") if p.is_dir() and p != keep)
        for old in steps[: max(0, len(steps) - (int(self.keep_last) - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    checkpoint_key = "merge"

    def evaluate(self, trainer: "lightning.Trainer", pl_module: "lightning.LightningModule") -> dict[str, float]:
        return self.merge_now(trainer, pl_module)

    def checkpoint_payload(self, metrics: dict[str, float]) -> dict[str, Any]:
        return {**metrics, f"{self.prefix}/output": str(self.last_output)}
