"""Evaluate one model on one task with batched greedy generation."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker, model_spec
from fusionlab.models import load_model
from fusionlab.models.chat import render_prompt
from fusionlab.models.generation import generate
from fusionlab.tasks import build_messages, get_task, load_examples, score, stop_strings, extract_answer

log = logging.getLogger(__name__)


def task_prompts(task_name: str, examples: list[dict], tokenizer, use_chat_template: bool) -> list[str]:
    prompts = []
    for ex in examples:
        messages, prefix = build_messages(task_name, ex)
        prompts.append(render_prompt(tokenizer, messages, use_chat_template=use_chat_template,
                                     assistant_prefix=prefix))
    return prompts


def task_stops(task_name: str, use_chat_template: bool) -> list[str]:
    """Task stop strings, plus the next-question marker that base models tend to write."""
    return stop_strings(task_name) + ([] if use_chat_template else ["\nQuestion:"])


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    spec = model_spec(cfg.model)
    task = get_task(cfg.task.name)
    examples = load_examples(task.name, path=cfg.task.get("path"), limit=cfg.task.get("limit"),
                             seed=cfg.task.get("seed", 0), shuffle=cfg.task.get("shuffle", False))
    gen = cfg.generation
    max_new_tokens = gen.max_new_tokens or task.max_new_tokens
    with make_tracker(cfg, output_dir) as tracker:
        model, tokenizer = load_model(spec)
        prompts = task_prompts(task.name, examples, tokenizer, spec.use_chat_template)
        result = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=gen.batch_size,
                          do_sample=gen.do_sample, temperature=gen.temperature, top_p=gen.top_p,
                          stop=task_stops(task.name, spec.use_chat_template), seed=cfg.seed)
        scores, correct = score(task.name, result.texts, examples)
        rows = [{"id": ex["id"], "prompt": p, "output": o, "extracted": extract_answer(task.name, o),
                 "gold": ex["answer"], "correct": c}
                for ex, p, o, c in zip(examples, prompts, result.texts, correct)]
        write_jsonl(output_dir / "predictions.jsonl", rows)
        metrics = {"task": task.name, "model": spec.name, **scores,
                   "tokens_per_s": round(result.tokens_per_s, 3), "new_tokens": sum(result.new_tokens),
                   "generate_s": round(result.seconds, 3)}
        tracker.log(metrics)
        tracker.log_table("predictions", rows)
        tracker.summary(metrics)
    log.info("%s on %s: %s", spec.name, task.name, {k: metrics[k] for k in scores})
    return metrics
