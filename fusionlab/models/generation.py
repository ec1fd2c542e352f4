"""Batched generation with HF ``generate``: left padding, KV cache, stop strings."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from fusionlab.errors import FusionlabError


@dataclass
class GenerationConfig:
    """Decoding settings shared by the ``evaluate`` and ``ensemble`` jobs (the ``generation:`` node)."""

    max_new_tokens: int | None = None  # None: the task's own default (TaskDef.max_new_tokens)
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0  # used only when do_sample is true
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise FusionlabError(f"generation.max_new_tokens={self.max_new_tokens} must be >= 1 (or null for the "
                                 "task's default).")
        if self.batch_size < 1:
            raise FusionlabError(f"generation.batch_size={self.batch_size} must be >= 1.")
        if self.do_sample and not self.temperature > 0:
            raise FusionlabError(f"generation.temperature={self.temperature} must be > 0 when sampling "
                                 "(generation.do_sample=true); use do_sample=false for greedy decoding.")
        if not 0 < self.top_p <= 1:
            raise FusionlabError(f"generation.top_p={self.top_p} must be in (0, 1].")
        if not self.do_sample and (self.temperature != 1.0 or self.top_p != 1.0):
            key, value = ("temperature", self.temperature) if self.temperature != 1.0 else ("top_p", self.top_p)
            raise FusionlabError(f"generation.{key}={value} has no effect with greedy decoding "
                                 "(generation.do_sample=false); set generation.do_sample=true to sample, or leave "
                                 f"generation.{key} at 1.0.")

    def new_tokens_for(self, task_default: int) -> int:
        """The user's ``max_new_tokens`` when set, else the task's own default."""
        return self.max_new_tokens if self.max_new_tokens is not None else task_default


@dataclass
class GenerationResult:
    texts: list[str]
    new_tokens: list[int]  # generated tokens per prompt (up to and including a stop)
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return sum(self.new_tokens) / self.seconds if self.seconds > 0 else 0.0


def truncate_at_stop(text: str, stop: list[str]) -> str:
    cut = min((text.find(s) for s in stop if s and s in text), default=-1)
    return text if cut < 0 else text[:cut]


def needs_special_tokens(tokenizer, prompt: str) -> bool:
    """Add BOS when tokenizing unless the prompt (e.g. from a chat template) already starts with it.

    Gemma-style models produce garbage without BOS; templates that include it must not get two.
    """
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and prompt.startswith(bos))


def check_logits(logits: torch.Tensor, model: torch.nn.Module) -> None:
    """Refuse next-token logits (..., V) holding NaN or +inf, or all -inf: greedy decoding would emit token 0 as
    if it were an answer and sampling would fail inside torch. One reduction per step (a max keeps NaN); the
    weights were checked at load, so this catches activations that overflow (float16) or a broken model."""
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):
        name = getattr(model, "name_or_path", "") or type(model).__name__
        raise FusionlabError(f"Model {name!r} produced NaN or inf next-token logits while generating: its "
                             "activations overflowed or the model is broken. Run it in float32 or bfloat16 "
                             "(model.dtype=float32) rather than float16, or check the checkpoint.")


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length")  # how HF configs name it


def check_context(model: torch.nn.Module, prompt_tokens: int, max_new_tokens: int, label: str = "") -> None:
    """Refuse a generation that cannot fit the model's context: past it, learned position embeddings fail with an
    index error mid-run and rotary ones decode positions they never saw. Checked before the first step."""
    config = getattr(model, "config", None)
    limit = next((getattr(config, k) for k in CONTEXT_KEYS if isinstance(getattr(config, k, None), int)), None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        name = label or getattr(model, "name_or_path", "") or type(model).__name__
        raise FusionlabError(f"Model {name!r}: the longest prompt ({prompt_tokens} tokens) plus max_new_tokens="
                             f"{max_new_tokens} is {prompt_tokens + max_new_tokens} tokens, past its context of {limit}; "
                             "lower generation.max_new_tokens (or task.n_shot for shorter prompts).")


class _FiniteLogits:
    """A ``generate`` logits processor: :func:`check_logits` on every step's scores (before temperature/top_p)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        check_logits(scores, self.model)
        return scores


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 8,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             stop: list[str] | None = None, seed: int | None = None, progress: bool = True) -> GenerationResult:
    """Generate a continuation for every prompt, ``batch_size`` prompts per ``model.generate`` call."""
    from transformers import LogitsProcessorList

    stop = [s for s in (stop or []) if s]
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    texts: list[str] = []
    counts: list[int] = []
    eos_ids = model.generation_config.eos_token_id
    eos_ids = set(eos_ids if isinstance(eos_ids, list) else [eos_ids]) - {None}
    if prompts:
        longest = max(len(tokenizer(p, add_special_tokens=needs_special_tokens(tokenizer, p))["input_ids"])
                      for p in prompts)
        check_context(model, longest, max_new_tokens)
    if seed is not None:
        torch.manual_seed(seed)
    start = time.perf_counter()
    try:
        for i in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
            chunk = prompts[i:i + batch_size]
            batch = tokenizer(chunk, return_tensors="pt", padding=True,
                              add_special_tokens=needs_special_tokens(tokenizer, chunk[0])).to(device)
            kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample,
                          pad_token_id=tokenizer.pad_token_id, use_cache=True,
                          logits_processor=LogitsProcessorList([_FiniteLogits(model)]))
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=stop, tokenizer=tokenizer)
            out = model.generate(**batch, **kwargs)
            new = out[:, batch["input_ids"].shape[1]:]
            for row in new.tolist():
                n = len(row)
                for j, t in enumerate(row):  # stop counting at the first EOS / pad after generation ended
                    if t in eos_ids:
                        n = j + 1
                        break
                counts.append(n)
                texts.append(truncate_at_stop(tokenizer.decode(row[:n], skip_special_tokens=True), stop))
    finally:
        tokenizer.padding_side = old_side
    return GenerationResult(texts, counts, time.perf_counter() - start)
