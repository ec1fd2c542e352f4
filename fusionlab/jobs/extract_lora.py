"""Job ``extract_lora``: the rank-r LoRA (peft format) of fine-tuned − base, its error per layer, its perplexity.

Config: ``extract_lora:``, a :class:`fusionlab.merge.lora.ExtractLoraConfig` (conf/experiment/extract_lora.yaml):
``base``, ``finetuned`` (``derived:<name>`` with ``derive`` as in the merge job), ``rank``, ``modules``,
``output`` (default ``<run dir>/lora``), ``eval``. Metrics: ``lora_err/<module>`` (relative Frobenius error),
``lora_err_mean`` / ``max``, ``lora_uncaptured_rel``, and ``ppl/<set>/{base,finetuned,lora}`` (lora = base + adapter).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.jobs._common import check_perplexity_objective, job_node, log_numbers, make_tracker


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge.derive import derive_models
    from fusionlab.merge.lora import extract_lora, resolve_lora
    from fusionlab.models.resolve import resolve_checkpoint

    ec = job_node(cfg, "extract_lora", " (base, finetuned, rank)", "+experiment=extract_lora")
    output = ec.output or str(output_dir / "lora")
    check_perplexity_objective(cfg, ec.eval, "extract_lora.eval")
    derived = derive_models(ec.derive, ec.base, used=[ec.base, ec.finetuned])
    metrics = extract_lora(ec.base, ec.finetuned, output, ec.rank, modules=ec.modules, dtype=ec.dtype,
                           overwrite=ec.overwrite, derived=derived)
    with make_tracker(cfg, output_dir) as tr:
        if ec.eval is not None:
            lora = resolve_lora(output, resolve_checkpoint(ec.base, derived))
            metrics.update(ec.eval.score({"base": ec.base, "finetuned": ec.finetuned, "lora": str(lora)}, derived))
        log_numbers(tr, metrics)
    return metrics
