"""Job ``tokensurgeon``: move a model onto another tokenizer (mergekit's tokensurgeon, rows from fusionlab's alignment).

Config: ``tokensurgeon:``, a :class:`fusionlab.merge.tokenizer.TokenSurgeonConfig`
(conf/experiment/tokensurgeon.yaml): ``model``, ``tokenizer`` (model:<ref>), ``fill``, ``output`` (default
``<run dir>/transplanted``), ``eval`` (text sets). Metrics: how each row was made (``vocab/0/exact``,
``aligned``, ``pieces`` ...), ``ppl/<set>/<model>`` of the model and the transplant (each on its own tokens:
compare transplants with each other, e.g. ``fill=alignment`` vs ``fill=mean``; experiments/merge/bench_tokenizer.py).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.jobs._common import job_node, log_numbers, make_tracker


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge.tokenizer import transplant

    ts = job_node(cfg, "tokensurgeon", " (model, tokenizer)", "+experiment=tokensurgeon")
    output = ts.output or str(output_dir / "transplanted")
    metrics: dict[str, Any] = transplant(ts.model, ts.tokenizer, output, fill=ts.fill, omp_k=ts.omp_k, head_fill=ts.head_fill,
                                         dtype=ts.dtype,
                                         overwrite=ts.overwrite)
    with make_tracker(cfg, output_dir) as tr:
        if ts.eval is not None:
            metrics.update(ts.eval.score({"model": ts.model, "transplanted": output}))
        log_numbers(tr, metrics)
    return metrics
