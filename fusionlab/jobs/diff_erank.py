"""Job ``diff_erank``: Diff-eRank of one or several models on a text set.

    python -m fusionlab.run +experiment=diff_erank
    python -m fusionlab.run +experiment=diff_erank models=null model=hf model.path=/my/checkpoint

Models: ``cfg.models`` (a dict name -> model spec, as the experiment composes it) or, when that
is null/absent, the single ``cfg.model``. Each model runs alone, then its untrained twin
(never both in memory). Writes ``per_layer.jsonl``, ``erank_layers.png`` and returns flat
metrics ``<model>/<key>`` (see :meth:`DiffERankResult.metrics`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker, to_dict
from fusionlab.metrics.diff_erank import DiffERankSettings, evaluate_diff_erank, load_texts, plot_layers

log = logging.getLogger(__name__)


def _model_specs(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    models = cfg.get("models")
    if models:
        if not isinstance(models, DictConfig):
            raise FusionlabError("`models` must be a mapping name -> model spec (or null to use `model`); "
                                 f"got {OmegaConf.to_yaml(models).strip()!r}.")
        return {str(k): to_dict(v) for k, v in models.items()}
    if cfg.get("model") is None:
        raise FusionlabError("The diff_erank job needs `model` (e.g. model=smollm2_135m) or a `models` mapping.")
    spec = to_dict(cfg.model)
    return {str(spec.get("name") or "model"): spec}


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    settings = DiffERankSettings.from_dict(to_dict(cfg.get("metric") or {}))
    texts = load_texts(settings.texts, settings.text_field, settings.limit)
    specs = _model_specs(cfg)
    metrics: dict[str, Any] = {"n_models": len(specs)}
    rows: list[dict[str, Any]] = []
    with make_tracker(cfg, output_dir) as tracker:
        for name, spec in specs.items():
            log.info("Diff-eRank of %s on %d texts", name, len(texts))
            result = evaluate_diff_erank(spec, texts, settings)
            model_metrics = result.metrics(prefix=f"{name}/", average=settings.average)
            metrics.update(model_metrics)
            rows += result.layer_rows(name)
            tracker.log(model_metrics)
            log.info("%s: eRank trained %.3f, untrained %.3f, Diff-eRank %.3f (%s mean over %d texts, %d skipped)",
                     name, model_metrics[f"{name}/erank_trained"], model_metrics[f"{name}/erank_untrained"],
                     model_metrics[f"{name}/diff_erank"], settings.average, result.n_texts, result.n_skipped)
        write_jsonl(output_dir / "per_layer.jsonl", rows)
        plot = plot_layers(rows, output_dir / "erank_layers.png", settings.average)
        tracker.log_table("diff_erank/per_layer", rows)
        tracker.log_image("diff_erank/per_layer_plot", plot)
        tracker.summary(metrics)
    return metrics
