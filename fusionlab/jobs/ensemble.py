"""Job ``ensemble``: EVA ensemble of the main ``model`` with ``ensemble.aux`` models on a task.

Writes the accuracy of each member alone and of the ensemble on the same examples, the drop
filter statistics, the alignment quality (P@1) and speeds; predictions go to predictions.jsonl.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from fusionlab.ensemble import EvaDecoder, align_members
from fusionlab.ensemble.config import EnsembleConfig
from fusionlab.io import write_jsonl
from fusionlab.jobs._common import make_tracker, model_spec, task_inputs, to_dict
from fusionlab.models import ModelSpec, cache_dir, load_model
from fusionlab.tasks import extract_answer, score, task_prompts, task_stops

log = logging.getLogger(__name__)


def alignment_options(cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    node = dict(to_dict(cfg.get("align_method")) or {"name": "vecmap_csls"})
    return node.pop("name"), node


def run(cfg: DictConfig, output_dir: Path) -> dict[str, Any]:
    ens = EnsembleConfig.from_dict(to_dict(cfg.ensemble))
    if ens.threads:  # 2 threads on 2 cores shared with other jobs ran 2-5x slower than 1 (experiments/eva/RESULTS.md)
        torch.set_num_threads(ens.threads)
    main_spec = model_spec(cfg.model)
    aux_specs = [ModelSpec.from_dict({"name": name, **spec}) for name, spec in ens.aux.items()]
    names = [main_spec.name] + [s.name for s in aux_specs]
    if len(set(names)) != len(names):
        names = [f"{n}_{i}" for i, n in enumerate(names)]
    task, examples, shots = task_inputs(cfg)
    gen = cfg.generation
    max_new_tokens = gen.max_new_tokens or task.max_new_tokens
    method, params = alignment_options(cfg)
    cache = Path(ens.cache_dir) if ens.cache_dir else cache_dir() / "align"

    with make_tracker(cfg, output_dir) as tracker:
        members = [load_model(main_spec)] + [load_model(s) for s in aux_specs]
        specs = [main_spec] + aux_specs
        alignments = align_members(members[0], members[1:], method, {**params, "progress": True}, cache,
                                   ens.rebuild_alignment)
        prompts = [task_prompts(task.name, examples, tok, s.use_chat_template, shots) for (_, tok), s in zip(members, specs)]
        stops = sorted({s for spec in specs for s in task_stops(task.name, spec.use_chat_template)})
        metrics: dict[str, Any] = {"task": task.name, "n": len(examples), "main": names[0], "aux": ",".join(names[1:]),
                                   "align_method": method}
        for name, a in zip(names[1:], alignments):
            for k in ("p_at_1", "seed_pairs", "rows_mapped", "nnz", "build_s", "cache_hit"):
                if k in a.stats:
                    metrics[f"align_{name}_{k}"] = a.stats[k]
        rows = [{"id": ex["id"], "gold": ex["answer"]} for ex in examples]

        log_step = [0]  # one increasing step across members and ensemble (W&B drops steps that go back)

        def decode(decoder, model_prompts, stop, tag):
            """All examples through ``decoder`` in batches: texts, tokens, seconds, steps, summed stats."""
            texts, n_tokens, seconds, stats_sum = [], 0, 0.0, {}
            for start in range(0, len(examples), ens.batch_size):
                out = decoder.generate([p[start:start + ens.batch_size] for p in model_prompts],
                                       max_new_tokens=max_new_tokens, stop=stop)
                texts += out.texts
                n_tokens += sum(out.new_tokens)
                seconds += out.seconds
                for k, v in out.stats.items():  # filter fractions: weighted by the batch's row-steps
                    stats_sum[k] = stats_sum.get(k, 0) + (v * out.stats["row_steps"] if k.startswith("filter_") else v)
                tracker.log({f"{tag}_batch_tokens_per_s": out.tokens_per_s,
                             **{f"{tag}_{k}": v for k, v in out.stats.items()}}, step=log_step[0])
                log_step[0] += 1
            return texts, n_tokens, seconds, stats_sum

        # Members alone go through the same KV-cached step loop as the ensemble (one model, no aux),
        # so accuracy and speed are compared like for like: same prompts, stops and decoding rule.
        kwargs = ens.decoder_kwargs()
        for member, ps in zip(members, prompts):  # warm-up (one-time kernel set-up) outside the timings
            EvaDecoder(member, [], [], **kwargs).generate([ps[:1]], max_new_tokens=1)
        member_step_s = []
        if ens.eval_members:
            for name, member, spec, ps in zip(names, members, specs, prompts):
                texts, n_tokens, seconds, st = decode(EvaDecoder(member, [], [], **kwargs), [ps],
                                                      task_stops(task.name, spec.use_chat_template), name)
                scores, correct = score(task.name, texts, examples)
                member_step_s.append(seconds / max(st["steps"], 1))
                metrics.update({f"{name}_{task.metric}": scores[task.metric],
                                f"{name}_tokens_per_s": round(n_tokens / seconds, 3) if seconds else 0.0,
                                f"{name}_step_ms": round(1000 * member_step_s[-1], 2)})
                for row, text, c in zip(rows, texts, correct):
                    row.update({f"{name}_output": text, f"{name}_extracted": extract_answer(task.name, text),
                                f"{name}_correct": c})
                log.info("%s alone: %s=%.4f (%.2f tok/s)", name, task.metric, scores[task.metric],
                         metrics[f"{name}_tokens_per_s"])

        decoder = EvaDecoder(members[0], members[1:], alignments, **kwargs)
        texts, n_tokens, seconds, stats_sum = decode(decoder, prompts, stops, "ensemble")
        steps = stats_sum["row_steps"]
        scores, correct = score(task.name, texts, examples)
        for row, ex, text, c in zip(rows, examples, texts, correct):
            row.update({"ensemble_output": text, "ensemble_extracted": extract_answer(task.name, text),
                        "ensemble_correct": c})
        write_jsonl(output_dir / "predictions.jsonl", rows)
        metrics.update({f"ensemble_{task.metric}": scores[task.metric], "ensemble_new_tokens": n_tokens,
                        "ensemble_tokens_per_s": round(n_tokens / seconds, 3) if seconds else 0.0,
                        "ensemble_generate_s": round(seconds, 3)})
        ens_step_s = seconds / max(stats_sum["steps"], 1)
        metrics["ensemble_step_ms"] = round(1000 * ens_step_s, 2)
        if member_step_s:  # target >= 0.85: the ensemble costs at most ~15% more than running its members
            metrics["ensemble_speed_vs_members"] = round(sum(member_step_s) / ens_step_s, 3)
        for k, v in stats_sum.items():
            metrics[f"ensemble_{k}"] = round(v / max(steps, 1), 4) if k.startswith("filter_") else v
        tracker.log(metrics)
        tracker.log_table("predictions", rows)
        tracker.summary(metrics)
    log.info("ensemble on %s: %s", task.name, {k: v for k, v in metrics.items() if k.endswith(task.metric)})
    return metrics
