"""Job ``chat_vector``: τ = chat − base (saved), merged = cp + ratio·τ, perplexity of all four models.

Config (``merge:``, see conf/experiment/chat_vector.yaml):
``base`` (the pre-trained model), ``chat`` (its chat fine-tune), ``cp`` (its continual pre-training),
each a path, an embedded name or ``derived:<name>``; ``ratio`` (a number, or a list with one ratio
per entry of ``chat``), ``skip_embed``, ``special_tokens_map`` ({cp_id: chat_id}),
``tokenizer_source`` (cp | chat), ``dtype``, ``output``, ``vector_output``, ``derive``, ``eval``
(as in the merge job).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.errors import FusionlabError
from fusionlab.jobs._common import make_tracker, to_dict
from fusionlab.jobs.merge import derive_models, label_of, perplexities, substitute

KEYS = {"base", "chat", "cp", "ratio", "skip_embed", "special_tokens_map", "tokenizer_source", "dtype", "output",
        "vector_output", "derive", "eval", "overwrite", "progress", "shard_size"}


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    from fusionlab.merge import chat_vector as cv

    m = dict(to_dict(cfg.get("merge")) or {})
    unknown = sorted(set(m) - KEYS)
    if unknown:
        raise FusionlabError(f"Unknown chat_vector option(s) merge.{unknown}; valid options are {sorted(KEYS)}.")
    for key in ("base", "chat", "cp"):
        if not m.get(key):
            raise FusionlabError(f"merge.{key} must be set for job=chat_vector (a checkpoint dir, an embedded model "
                                 "name or derived:<name>).")
    chats = m["chat"] if isinstance(m["chat"], list) else [m["chat"]]
    ratio = m.get("ratio", 1.0)
    ratios = ratio if isinstance(ratio, list) else [ratio] * len(chats)
    derived = derive_models(m["base"], m.get("derive") or {})
    base, cp = substitute(m["base"], derived), substitute(m["cp"], derived)
    chat_dirs = [substitute(c, derived) for c in chats]
    common = {"overwrite": bool(m.get("overwrite", False)), "progress": m.get("progress", True),
              "shard_size": m.get("shard_size") or "5GB"}
    vec_root = Path(m.get("vector_output") or output_dir / "chat_vectors")
    vectors = []
    metrics: dict[str, Any] = {}
    for i, chat in enumerate(chat_dirs):
        out = vec_root / f"cv{i}"
        info = cv.extract(base, chat, out, skip_embed=bool(m.get("skip_embed", False)), **common)
        vectors.append(str(out))
        metrics.update({f"{k}/{i}": v for k, v in info.items()})
    merged = str(m.get("output") or output_dir / "merged")
    smap = m.get("special_tokens_map") or None
    metrics.update(cv.add(cp, vectors, [float(r) for r in ratios], merged, skip_embed=bool(m.get("skip_embed", False)),
                          special_tokens_map=smap, tokenizer_source=m.get("tokenizer_source") or "cp",
                          dtype=m.get("dtype") or "auto", **common))
    metrics["merge_output"] = merged
    models = {"base": base, "cp": cp, **{f"chat{'' if len(chats) == 1 else i}": d for i, d in enumerate(chat_dirs)},
              "merged": merged}
    with make_tracker(cfg, output_dir) as tr:
        ppl = perplexities(models, m.get("eval") or {})
        metrics.update(ppl)
        tr.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tr.summary({**metrics, "inputs": {k: label_of(str(v)) for k, v in models.items()}})
    return metrics
