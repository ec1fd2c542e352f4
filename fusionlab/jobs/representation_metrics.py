"""Job ``representation_metrics`` (also run as ``diff_erank``): the selected representation metrics of one
or several models on a text set, per layer, from one forward pass per model (and its untrained twin
where a metric is a difference against it).

    python -m fusionlab.run +experiment=representation_metrics             # the whole suite, both embedded models
    python -m fusionlab.run +experiment=diff_erank                         # Diff-eRank alone
    python -m fusionlab.run +experiment=representation_metrics models=null model=hf model.path=/my/checkpoint

Models: ``cfg.models`` (name -> model spec) or, when that is null, the single ``cfg.model``.
Writes ``per_layer.jsonl`` (one row per model x layer, every metric's values), one
``<metric>_layers.png`` per metric, and returns flat metrics ``<model>/<key>`` (last selected
layer) and ``<model>/layer<i>/<key>`` (every selected layer); W&B gets the table and the plots.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker
from fusionlab.metrics.suite import MetricConfig, evaluate_model, plot_metrics
from fusionlab.tasks.texts import load_text_set

log = logging.getLogger(__name__)


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    settings = OmegaConf.to_object(cfg.metric) if cfg.get("metric") is not None else MetricConfig()
    texts = load_text_set(settings.texts, field=settings.text_field, stop=settings.limit)
    if cfg.get("models"):
        specs = OmegaConf.to_object(cfg.models)
    else:  # the spec's own name: a null model.name (model=hf) becomes its path there
        spec = OmegaConf.to_object(cfg.model)
        specs = {spec.name: spec}
    objective = cfg.get("objective")
    if objective and "/" in objective and objective.split("/")[0] not in specs:  # before any model loads
        raise FusionlabError(f"objective={objective!r} names model {objective.split('/')[0]!r}, which this run does "
                             f"not score (its models: {sorted(specs)}); set objective=<model>/<metric> for one of "
                             "them, or objective=null.")
    metrics: dict[str, Any] = {"n_models": len(specs)}
    rows: list[dict[str, Any]] = []
    with make_tracker(cfg, output_dir) as tracker:
        for name, spec in specs.items():
            log.info("%s of %s on %d texts", ", ".join(settings.metrics), name, len(texts))
            result = evaluate_model(spec, texts, settings)
            model_metrics = result.flat(prefix=f"{name}/")
            metrics.update(model_metrics)
            rows += result.rows(name)
            tracker.log(model_metrics)
            log.info("%s, hidden state %d (%d texts, %d skipped): %s", name, result.layers[-1], result.n_texts,
                     result.n_skipped, ", ".join(f"{k} {v:.4g}" for k, v in result.table[-1].items()
                                                 if not k.endswith(("_geo", "_arith"))))
        write_jsonl(output_dir / "per_layer.jsonl", rows)
        tracker.log_table(f"{cfg.job}/per_layer", rows)
        for plot in plot_metrics(rows, settings.metrics, output_dir):
            tracker.log_image(f"{cfg.job}/{plot.stem}", plot)
        tracker.summary(metrics)
    return metrics
