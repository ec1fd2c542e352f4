"""Job ``extract_lora``: the rank-r LoRA (peft format) of fine-tuned − base, its error per layer, its perplexity.

Config: ``extract_lora:``, a :class:`fusionlab.merge.lora.ExtractLoraConfig` (conf/experiment/extract_lora.yaml):
``base``, ``finetuned`` (``derived:<name>`` with ``derive`` as in the merge job), ``rank``, ``modules``,
``output`` (default ``<run dir>/lora``), ``eval``. Metrics: ``lora_err/<module>`` (relative Frobenius error),
``lora_err_mean`` / ``max``, ``lora_uncaptured_rel``, and ``ppl/<set>/{base,finetuned,lora}`` (lora = base + adapter).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import make_tracker


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge.derive import derive_models
    from fusionlab.merge.lora import extract_lora, resolve_lora
    from fusionlab.models.resolve import resolve_checkpoint

    if cfg.get("extract_lora") is None:
        raise FusionlabError("job=extract_lora needs an extract_lora: block (base, finetuned, rank); start from "
                             "+experiment=extract_lora.")
    ec = OmegaConf.to_object(cfg.extract_lora)
    output = ec.output or str(output_dir / "lora")
    derived = derive_models(ec.derive, ec.base)
    metrics = extract_lora(ec.base, ec.finetuned, output, ec.rank, modules=ec.modules, dtype=ec.dtype,
                           overwrite=ec.overwrite, derived=derived)
    with make_tracker(cfg, output_dir) as tr:
        if ec.eval is not None:
            lora = resolve_lora(output, resolve_checkpoint(ec.base, derived))
            metrics.update(ec.eval.score({"base": ec.base, "finetuned": ec.finetuned, "lora": str(lora)}, derived))
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tr.summary(metrics)
    return metrics
