"""Job ``merge``: derive inputs if asked, merge (fusionlab engine), score inputs and output by perplexity.

Config: ``merge:``, a :class:`fusionlab.merge.MergeConfig` (conf/experiment/merge.yaml,
conf/merge_method/*.yaml): the merge itself, or ``mergekit_config`` (a mergekit YAML); ``derive``
(short cached fine-tunes of the base, referred to as ``derived:<name>``) and ``eval`` (text sets)
from :mod:`fusionlab.merge.derive`. Metrics: the engine's summary, ``ppl/<set>/<model>``,
``ppl_mean/<model>`` and ``ppl_mean/merged_over_best_input``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.jobs._common import check_perplexity_objective, job_node, log_numbers, make_tracker


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge import merge, plan
    from fusionlab.merge.derive import derive_models, label_of

    mc = job_node(cfg, "merge", "", "+experiment=merge (or sce_merge), e.g. +experiment=merge "
                  "merge.mergekit_config=path.yml").for_run(output_dir / "merged", cfg.get("seed"))
    check_perplexity_objective(cfg, mc.eval, "merge.eval")
    derived = derive_models(mc.derive, mc.reference, used=mc.model_refs)
    planned = plan(mc, derived)  # every config error surfaces here, before a tracker or any output exists
    with make_tracker(cfg, output_dir) as tr:
        metrics: dict[str, Any] = {"merge_method": mc.method, **merge(mc, planned)}
        if mc.eval is not None:
            inputs = {"base": mc.base} if mc.base else {}
            inputs.update({label_of(m.model): m.model for m in mc.models if m.model != mc.base})
            ppl = mc.eval.score({**inputs, "merged": mc.output}, derived)
            metrics.update(ppl)
            if ppl:
                best = min(ppl[f"ppl_mean/{label}"] for label in inputs)
                metrics["ppl_mean/merged_over_best_input"] = round(ppl["ppl_mean/merged"] / best, 4)
        log_numbers(tr, metrics)
    return metrics
