"""Job ``evaluate``: one model on one task, batched generation; metrics.json + predictions.jsonl."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker, model_spec, task_inputs
from fusionlab.models import load_model
from fusionlab.models.generation import GenerationConfig, generate
from fusionlab.tasks import extract_answer, get_task, score, task_prompts, task_stops

log = logging.getLogger(__name__)


def metric_names(cfg: DictConfig) -> list[str]:
    """The numbers this run writes to metrics.json (an ``objective`` is checked against them before any work)."""
    return [get_task(cfg.task.name).metric, "n", "n_shot", "tokens_per_s", "new_tokens", "generate_s"]


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    spec = model_spec(cfg.model)
    gen: GenerationConfig = OmegaConf.to_object(cfg.generation)
    task, examples, shots = task_inputs(cfg)
    with make_tracker(cfg, output_dir) as tracker:
        model, tokenizer = load_model(spec)
        prompts = task_prompts(task, examples, tokenizer, spec.use_chat_template, shots)
        result = generate(model, tokenizer, prompts, max_new_tokens=gen.new_tokens_for(task.max_new_tokens),
                          batch_size=gen.batch_size, do_sample=gen.do_sample, temperature=gen.temperature,
                          top_p=gen.top_p, stop=task_stops(task, spec.use_chat_template), seed=cfg.seed)
        scores, correct = score(task, result.texts, examples)
        rows = [{"id": ex["id"], "prompt": p, "output": o, "extracted": extract_answer(task, o),
                 "gold": ex["answer"], "correct": c}
                for ex, p, o, c in zip(examples, prompts, result.texts, correct)]
        write_jsonl(output_dir / "predictions.jsonl", rows)
        metrics = {"task": task.name, "model": spec.name, "n_shot": len(shots), **scores,
                   "tokens_per_s": round(result.tokens_per_s, 3), "new_tokens": sum(result.new_tokens),
                   "generate_s": round(result.seconds, 3)}
        tracker.log(metrics)
        tracker.log_table("predictions", rows)
        tracker.summary(metrics)
    log.info("%s on %s: %s", spec.name, task.name, scores)
    return metrics
