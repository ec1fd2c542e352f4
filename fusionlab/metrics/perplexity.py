"""Perplexity of a checkpoint on plain texts: how the merge experiments and callbacks score a model.

exp(mean token NLL) over the texts, padding excluded, every token after the first predicted;
:func:`perplexity_table` scores several models on several text sets at once, in the flat
``ppl/<set>/<model>`` / ``ppl_mean/<model>`` form that ``metrics.json`` and the sweeps read.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch


@torch.no_grad()
def perplexity(model_dir: str | Path, texts: list[str] | Mapping[str, list[str]], max_length: int = 256,
               batch_size: int = 4) -> float | dict[str, float]:
    """exp(mean token NLL) of a checkpoint over ``texts`` (padding excluded); a dict of text sets gives one each."""
    from fusionlab.models import ModelSpec, load_model

    # through load_model: a damaged directory or a NaN/inf weight is refused, naming it, not scored as a number
    model, tok = load_model(ModelSpec(name=str(model_dir), source="hf", path=str(model_dir)))
    tok.padding_side = "right"
    sets = texts if isinstance(texts, Mapping) else {"": texts}
    out = {}
    for name, items in sets.items():
        nll, count = 0.0, 0
        for i in range(0, len(items), batch_size):
            enc = tok(items[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
            logits = model(**enc).logits[:, :-1].float()
            labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            nll += float(loss)
            count += int((labels != -100).sum())
        out[name] = math.exp(nll / max(count, 1))
    return out if isinstance(texts, Mapping) else out[""]


def perplexity_table(models: Mapping[str, str | Path], texts: Mapping[str, list[str]], max_length: int = 256,
                     batch_size: int = 4) -> dict[str, float]:
    """``ppl/<set>/<label>`` for every model (label → checkpoint dir) and text set, and
    ``ppl_mean/<label>``, the geometric mean over the sets (rounded to 4 decimals)."""
    metrics: dict[str, float] = {}
    if not texts:
        return metrics
    for label, model_dir in models.items():
        ppl = perplexity(model_dir, texts, max_length, batch_size)
        for name, value in ppl.items():
            metrics[f"ppl/{name}/{label}"] = round(value, 4)
        metrics[f"ppl_mean/{label}"] = round(math.exp(sum(math.log(v) for v in ppl.values()) / len(ppl)), 4)
    return metrics
