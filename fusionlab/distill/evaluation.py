"""Held-out evaluation of a distill run: is the fused model better than the pivot and than plain CLM training?

FuseLLM / FuseChat claim that training on the sources' distributions beats continued causal-LM
training on the same data at the same cost. Every distill run therefore scores, on conversations
it never trained on (the held-out split of :func:`fusionlab.distill.conversations.split_conversations`):

- the assistant-token cross-entropy of each model (the untouched ``pivot``, the ``fused`` model, the
  ``clm`` baseline twin), per conversation — the quantity both training losses optimise, in the pivot's
  chat template — as a mean over conversations with a 95% percentile-bootstrap interval, and its
  perplexity exp(CE) with the interval's ends exponentiated;
- paired differences (``fused − clm``, ``fused − pivot``, ``clm − pivot``) on the SAME conversations
  (:func:`fusionlab.metrics.stats.paired_bootstrap`), which is what decides whether fusion helped;
- optionally the accuracy on a shipped task through the ``evaluate`` job's generation path (task
  prompts → :func:`fusionlab.models.generation.generate` → :func:`fusionlab.tasks.score`), with
  Wilson intervals and a paired difference over the same examples.

Metric names: ``<split>/ce/<model>`` (+ ``_low``/``_high``), ``<split>/ppl/<model>``,
``<split>/ce_diff/<a>_minus_<b>``, ``<split>/<task metric>/<model>`` (``<split>/task``: the task's name,
``<split>/<task metric>_examples``: its n); ``<split>`` is ``heldout``
(``dev`` when settings are being chosen on a dev slice of the training conversations).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fusionlab.errors import FusionlabError
from fusionlab.models.generation import GenerationConfig
from fusionlab.tasks import TaskConfig

# (a, b) pairs reported as a − b when both were scored; fused − clm is the comparison that matters
DIFFERENCES = (("fused", "clm"), ("fused", "pivot"), ("clm", "pivot"))
RESAMPLES = 10000


@dataclass
class EvalConfig:
    """``distill.eval``: how the held-out conversations (``distill.data.heldout``) and a task are scored."""

    batch_size: int = 4  # held-out conversations per forward pass
    limit: int | None = None  # score only the first N held-out conversations (cost); null: all of them
    task: str | None = None  # a shipped task scored by generation (as the evaluate job), e.g. addsub_eq; null: none
    task_limit: int | None = 40  # its first N examples (null: all)
    n_shot: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)  # decoding for the task (greedy)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise FusionlabError(f"distill.eval.batch_size={self.batch_size} must be >= 1.")
        if self.limit is not None and self.limit < 1:
            raise FusionlabError(f"distill.eval.limit={self.limit} must be >= 1 (or null: all held-out conversations).")
        if self.task is not None:
            self.task_config()  # an unknown task or a bad limit fails now, before any model loads

    def task_config(self) -> TaskConfig:
        try:
            return TaskConfig(name=self.task, limit=self.task_limit, n_shot=self.n_shot)
        except FusionlabError as err:
            raise FusionlabError(f"distill.eval (task={self.task!r}, task_limit={self.task_limit}, n_shot="
                                 f"{self.n_shot}): {err}") from None


def assistant_ce(model, tokenizer, texts: list[dict[str, Any]], batch_size: int = 4) -> list[float]:
    """Per conversation, the mean next-token cross-entropy over its assistant tokens (as the training
    loss counts them: position t is scored when token t+1 is an assistant token).

    ``texts``: ``{"id", "text", "spans"}`` as :func:`~fusionlab.distill.representations.prepare_texts`
    makes them (pivot template, cut at ``max_length`` pivot tokens). A text without an assistant token
    after the cut is an error: it would silently shrink the held-out set.
    """
    import numpy as np
    import torch

    from fusionlab.distill.representations import tokenize_with_spans

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenize_with_spans(tokenizer, t["text"], t["spans"], add_bos=False) for t in texts]
    for t, e in zip(texts, encoded):
        if not e["assistant"][1:].any():
            raise FusionlabError(f"Held-out conversation {t['id']!r} has no assistant token to score after the "
                                 "cut at distill.data.max_length pivot tokens; raise max_length or drop it.")
    out: list[float] = []
    try:
        for start in range(0, len(encoded), batch_size):
            group = encoded[start:start + batch_size]
            n = max(len(g["input_ids"]) for g in group)
            ids = torch.zeros(len(group), n, dtype=torch.long)
            att = torch.zeros(len(group), n, dtype=torch.long)
            target = torch.zeros(len(group), n - 1, dtype=torch.bool)
            for b, g in enumerate(group):
                m = len(g["input_ids"])
                ids[b, :m] = torch.as_tensor(g["input_ids"].astype(np.int64))
                att[b, :m] = 1
                target[b, :m - 1] = torch.as_tensor(g["assistant"][1:])
            ids, att, target = ids.to(device), att.to(device), target.to(device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
            logp = torch.log_softmax(logits, dim=-1)
            nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
            out += ((nll * target).sum(1) / target.sum(1)).tolist()
    finally:
        model.train(was_training)
    return out


def mean_interval(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the 95% percentile-bootstrap interval of a mean over conversations."""
    d = paired_difference(values, [0.0] * len(values), seed)
    return d.diff, d.low, d.high


def paired_difference(a: list[float], b: list[float], seed: int = 0):
    from fusionlab.metrics.stats import paired_bootstrap

    return paired_bootstrap(a, b, resamples=RESAMPLES, seed=seed)


def ce_metrics(per_model: dict[str, list[float]], split: str = "heldout", seed: int = 0,
               differences=DIFFERENCES) -> dict[str, Any]:
    """CE and perplexity with intervals per model, and the paired ``differences`` [(a, b): a − b]."""
    metrics: dict[str, Any] = {}
    for name, ces in per_model.items():
        mean, low, high = mean_interval(ces, seed)
        metrics.update({f"{split}/ce/{name}": mean, f"{split}/ce/{name}_low": low, f"{split}/ce/{name}_high": high,
                        f"{split}/ppl/{name}": math.exp(mean), f"{split}/ppl/{name}_low": math.exp(low),
                        f"{split}/ppl/{name}_high": math.exp(high)})
    for a, b in differences:
        if a in per_model and b in per_model:
            d = paired_difference(per_model[a], per_model[b], seed)
            metrics.update({f"{split}/ce_diff/{a}_minus_{b}": d.diff, f"{split}/ce_diff/{a}_minus_{b}_low": d.low,
                            f"{split}/ce_diff/{a}_minus_{b}_high": d.high})
    if per_model:
        metrics[f"{split}/conversations"] = len(next(iter(per_model.values())))
    return metrics


def task_correct(model, tokenizer, use_chat_template: bool, task_config: TaskConfig, generation: GenerationConfig,
                 seed: int = 0) -> tuple[str, list[float]]:
    """(metric name, per-example scores) of ``model`` on a task, through the ``evaluate`` job's path."""
    from fusionlab.models.generation import generate
    from fusionlab.tasks import score, task_inputs, task_prompts, task_stops

    inputs = task_inputs(task_config)
    task = inputs.task
    prompts = task_prompts(task, inputs.examples, tokenizer, use_chat_template, inputs.shots)
    was_training = model.training
    model.eval()
    try:
        result = generate(model, tokenizer, prompts, max_new_tokens=generation.new_tokens_for(task.max_new_tokens),
                          batch_size=generation.batch_size, do_sample=generation.do_sample,
                          temperature=generation.temperature, top_p=generation.top_p,
                          stop=task_stops(task, use_chat_template), seed=seed, progress=False)
    finally:
        model.train(was_training)
    _, correct = score(task, result.texts, inputs.examples)
    return task.metric, [float(bool(c)) for c in correct]


def task_metrics(per_model: dict[str, list[float]], metric: str, split: str = "heldout",
                 seed: int = 0, differences=DIFFERENCES) -> dict[str, Any]:
    """Task accuracy per model with a Wilson interval, and paired differences over the same examples."""
    from fusionlab.metrics.stats import wilson_interval

    metrics: dict[str, Any] = {f"{split}/{metric}_examples": max((len(c) for c in per_model.values()), default=0)}
    for name, correct in per_model.items():
        k, n = int(sum(correct)), len(correct)
        low, high = wilson_interval(k, n)
        metrics.update({f"{split}/{metric}/{name}": k / max(n, 1), f"{split}/{metric}/{name}_low": low,
                        f"{split}/{metric}/{name}_high": high})
    for a, b in differences:
        if a in per_model and b in per_model:
            d = paired_difference(per_model[a], per_model[b], seed)
            metrics.update({f"{split}/{metric}_diff/{a}_minus_{b}": d.diff,
                            f"{split}/{metric}_diff/{a}_minus_{b}_low": d.low,
                            f"{split}/{metric}_diff/{a}_minus_{b}_high": d.high})
    return metrics


@dataclass
class HeldoutSet:
    """What a trained model is scored on — the same texts, settings and table name at the end of its fit and,
    through :class:`fusionlab.callbacks.heldout.HeldoutEval`, at its checkpoints (the fit attaches it to the
    module as ``pl_module.heldout``)."""

    split: str  # heldout | dev
    texts: list[dict[str, Any]]  # rendered and cut as the training texts (pipeline.scored_texts)
    config: EvalConfig
    name: str = "fused"  # the trained model's column: fused, clm (the CLM twin), sft (implicit fusion)
    use_chat_template: bool = True
    seed: int = 0  # bootstrap seed of the intervals


@dataclass
class HeldoutScores:
    """Per-model held-out scores collected along a run; :meth:`metrics` turns them into numbers."""

    split: str = "heldout"
    ce: dict[str, list[float]] = field(default_factory=dict)
    task: dict[str, list[float]] = field(default_factory=dict)
    task_metric: str | None = None
    task_name: str | None = None
    differences: list[tuple[str, str]] | None = None  # default DIFFERENCES (fused/clm/pivot)

    def score(self, name: str, model, tokenizer, texts: list[dict[str, Any]], config: EvalConfig,
              use_chat_template: bool = True, seed: int = 0) -> None:
        self.ce[name] = assistant_ce(model, tokenizer, texts, config.batch_size)
        if config.task is not None:
            self.task_name = config.task
            self.task_metric, self.task[name] = task_correct(model, tokenizer, use_chat_template,
                                                             config.task_config(), config.generation, seed)

    def metrics(self, seed: int = 0) -> dict[str, Any]:
        diffs = DIFFERENCES if self.differences is None else self.differences
        out = ce_metrics(self.ce, self.split, seed, diffs)
        if self.task_metric:
            out.update(task_metrics(self.task, self.task_metric, self.split, seed, diffs))
            out[f"{self.split}/task"] = self.task_name
        return out
