"""Members alone vs their EVA ensemble on the same task examples: one implementation for the
``ensemble`` job, the ``eva_eval`` callback and notebooks.

Members alone go through the same KV-cached step loop as the ensemble (one model, no aux) with the
same prompts, stops, decoding rule and threads per member, so accuracy and step time compare like
for like. The report gives each system's score with a 95% Wilson interval, the paired difference
ensemble − best member with a 95% paired-bootstrap interval over the same examples, the gate and
filter statistics, the aux mass that projected nowhere, and step times (ensemble vs the sum and the
max of its members).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fusionlab.align.alignment import Alignment
from fusionlab.ensemble.config import DecodingOptions
from fusionlab.ensemble.decoder import EnsembleOutput, EvaDecoder, add_stats, summarize
from fusionlab.metrics.stats import paired_bootstrap, wilson_interval
from fusionlab.tasks import extract_answer, get_task, score, task_prompts, task_stops

ALIGN_STATS = ("p_at_1", "seed_pairs", "rows_mapped", "nnz", "build_s", "cache_hit")
UNMAPPED_WARNING = 0.1  # aux top-k mass that projects nowhere, above which a run warns

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One model of the ensemble (the first one given is the main model)."""

    name: str
    model: Any
    tokenizer: Any
    use_chat_template: bool = True


@dataclass
class EnsembleReport:
    metrics: dict[str, Any]  # flat: what metrics.json gets
    rows: list[dict[str, Any]]  # one per example: gold, each system's output, extracted answer, correctness
    systems: list[str] = field(default_factory=list)  # members evaluated alone, then "ensemble"
    metric: str = "accuracy"

    def table(self) -> str:
        """The comparison as a small text table (what the job prints at the end)."""
        m, width = self.metrics, max([len(s) for s in self.systems] + [8])
        lines = [f"{'system':<{width}}  {self.metric:>9}  95% CI (Wilson)"]
        for s in self.systems:
            low, high = m.get(f"{s}_{self.metric}_ci_low"), m.get(f"{s}_{self.metric}_ci_high")
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None else "-"
            lines.append(f"{s:<{width}}  {m[f'{s}_{self.metric}']:>9.3f}  {ci}")
        key = f"ensemble_minus_best_{self.metric}"
        if key in m:
            lines.append(f"ensemble - best member ({m['best_member']}): {m[key]:+.3f} "
                         f"[{m[key + '_ci_low']:+.3f}, {m[key + '_ci_high']:+.3f}] "
                         f"(95% paired bootstrap, {m['bootstrap_samples']} resamples, n={m['n']})")
        if "ensemble_step_ms" in m and "ensemble_step_vs_slowest" in m:
            lines.append(f"step: ensemble {m['ensemble_step_ms']:.1f} ms = {m['ensemble_step_vs_slowest']:.2f} x "
                         f"the slowest member; gate fired on {m['ensemble_gate_fired_frac']:.1%} of row-steps")
        return "\n".join(lines)


def evaluate_ensemble(members: Sequence[Member], alignments: Sequence[Alignment], task: str,
                      examples: list[dict[str, Any]], options: DecodingOptions, max_new_tokens: int, *,
                      shots: Sequence[dict[str, Any]] = (), batch_size: int = 8, eval_members: bool = True,
                      bootstrap_samples: int = 10000, seed: int = 0,
                      on_batch: Callable[[str, EnsembleOutput], None] | None = None) -> EnsembleReport:
    """Decode ``examples`` with each member alone (``eval_members``) and with the ensemble; score them."""
    metric = get_task(task).metric
    names = [m.name for m in members]
    threads = options.member_threads(len(members))
    options = dataclasses.replace(options.decoding(), threads=threads)  # members alone: same threads as inside
    prompts = [task_prompts(task, examples, m.tokenizer, m.use_chat_template, list(shots)) for m in members]
    stops = [task_stops(task, m.use_chat_template) for m in members]
    metrics: dict[str, Any] = {"task": task, "n": len(examples), "main": names[0], "aux": ",".join(names[1:]),
                               "align_method": alignments[0].method if alignments else "", "threads_per_member": threads}
    for name, a in zip(names[1:], alignments):
        metrics.update({f"align_{name}_{k}": a.stats[k] for k in ALIGN_STATS if k in a.stats})
    rows = [{"id": ex["id"], "gold": ex["answer"]} for ex in examples]
    correct: dict[str, list] = {}

    def run(tag: str, decoder: EvaDecoder, model_prompts: list[list[str]], stop: list[str]) -> float:
        """Every example through ``decoder``; scores, rows and speed go into ``metrics``; returns s/step."""
        texts, n_tokens, seconds, stats = [], 0, 0.0, {}
        for start in range(0, len(examples), batch_size):
            out = decoder.generate([p[start:start + batch_size] for p in model_prompts],
                                   max_new_tokens=max_new_tokens, stop=stop)
            texts += out.texts
            n_tokens += sum(out.new_tokens)
            seconds += out.seconds
            add_stats(stats, out.stats)
            if on_batch is not None:
                on_batch(tag, out)
        scores, correct[tag] = score(task, texts, examples)
        for row, text, c in zip(rows, texts, correct[tag]):
            row.update({f"{tag}_output": text, f"{tag}_extracted": extract_answer(task, text), f"{tag}_correct": c})
        step_s = seconds / max(stats["steps"], 1)
        metrics.update({f"{tag}_{metric}": scores[metric], f"{tag}_new_tokens": n_tokens,
                        f"{tag}_tokens_per_s": round(n_tokens / seconds, 3) if seconds else 0.0,
                        f"{tag}_step_ms": round(1000 * step_s, 2)})
        if tag == "ensemble":
            summary = summarize(stats)
            for i, name in enumerate(names[1:]):  # aux mass that projected nowhere, by aux name
                summary[f"{name}_unmapped_mass"] = lost = summary.pop(f"aux_unmapped_{i}_mass")
                if lost > UNMAPPED_WARNING:
                    log.warning("%.0f%% of aux model %r's top-k probability mass projected nowhere in the main "
                                "vocabulary (tokens without an alignment row): its votes are partly lost. Align "
                                "its whole vocabulary (align_method.aux_vocab_cutoff=null).", 100 * lost, name)
            metrics.update({f"ensemble_{k}": v for k, v in summary.items() if k not in ("steps",)})
            metrics["ensemble_generate_s"] = round(seconds, 3)
        return step_s

    member_step_s = []
    if eval_members:
        for m, ps in zip(members, prompts):  # warm-up (one-time kernel set-up) outside the timings
            EvaDecoder((m.model, m.tokenizer), options=options).generate([ps[:1]], max_new_tokens=1)
        for m, ps, stop in zip(members, prompts, stops):
            member_step_s.append(run(m.name, EvaDecoder((m.model, m.tokenizer), options=options), [ps], stop))
    ensemble = EvaDecoder((members[0].model, members[0].tokenizer),
                          [(m.model, m.tokenizer) for m in members[1:]], alignments, options=options)
    ens_step_s = run("ensemble", ensemble, prompts, sorted({s for st in stops for s in st}))
    if member_step_s:
        metrics["ensemble_speed_vs_members"] = round(sum(member_step_s) / ens_step_s, 3)  # > 1: faster than the sum
        metrics["ensemble_step_vs_slowest"] = round(ens_step_s / max(member_step_s), 3)  # target <= 1.15
    systems = (names if eval_members else []) + ["ensemble"]
    metrics.update(_intervals(systems, correct, metric, bootstrap_samples, seed))
    return EnsembleReport(metrics, rows, systems, metric)


def _intervals(systems: list[str], correct: dict[str, list], metric: str, resamples: int, seed: int) -> dict[str, Any]:
    """Wilson intervals per system and the paired bootstrap of ensemble − best member (per-example metrics only)."""
    if any(c is None for c in correct["ensemble"]):  # a corpus-level metric (BLEU): no per-example scores
        return {}
    out: dict[str, Any] = {}
    for s in systems:
        low, high = wilson_interval(sum(bool(c) for c in correct[s]), len(correct[s]))
        out.update({f"{s}_{metric}_ci_low": round(low, 4), f"{s}_{metric}_ci_high": round(high, 4)})
    members = systems[:-1]
    if members:
        best = max(members, key=lambda s: sum(bool(c) for c in correct[s]))  # the first (main) on ties
        d = paired_bootstrap([float(bool(c)) for c in correct["ensemble"]], [float(bool(c)) for c in correct[best]],
                             resamples=resamples, seed=seed)
        key = f"ensemble_minus_best_{metric}"
        out.update({"best_member": best, key: round(d.diff, 4), f"{key}_ci_low": round(d.low, 4),
                    f"{key}_ci_high": round(d.high, 4), "bootstrap_samples": resamples})
    return out
