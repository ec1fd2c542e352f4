"""Job ``chat_vector``: τ = chat − base (saved), merged = cp + ratio·τ, perplexity of all four models.

Config: ``chat_vector:``, a :class:`fusionlab.merge.chat_vector.ChatVectorConfig`
(conf/experiment/chat_vector.yaml): ``base`` (the pre-trained model), ``chat`` (its chat
fine-tune, or a list), ``cp`` (its continual pre-training), ``ratio``, ``skip_embed``,
``special_tokens_map``, ``tokenizer_source``, outputs, and ``derive`` / ``eval`` as in the merge job.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.jobs._common import check_perplexity_objective, job_node, make_tracker


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge.chat_vector import transfer
    from fusionlab.merge.derive import derive_models, label_of

    cv = job_node(cfg, "chat_vector", " (base, chat, cp)", "+experiment=chat_vector").for_run(output_dir)
    check_perplexity_objective(cfg, cv.eval, "chat_vector.eval")
    derived = derive_models(cv.derive, cv.base, used=cv.models().values())
    metrics = transfer(cv, derived)
    with make_tracker(cfg, output_dir) as tr:
        if cv.eval is not None:
            metrics.update(cv.eval.score(cv.models(), derived))
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tr.summary({**metrics, "inputs": {k: label_of(v) for k, v in cv.models().items()}})
    return metrics
