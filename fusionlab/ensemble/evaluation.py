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
from fusionlab.metrics.stats import PairedDifference, paired_bootstrap, paired_bootstrap_corpus, wilson_interval
from fusionlab.tasks import corpus_statistics, extract_answer, get_task, score, task_prompts, task_stops

ALIGN_STATS = ("p_at_1", "p_at_1_inside_cutoff", "seed_pairs", "rows_mapped", "nnz", "build_s", "cache_hit")
UNMAPPED_WARNING = 0.1  # aux top-k mass that projects nowhere, above which a run warns
# Compatibility check (SUCCESSORS.md §1d, after UniTE's partner rule): a member is likely to hurt when its
# warm-up score is more than 10% (relative) below the main model's beyond warm-up noise, its replies are more than 2x longer or
# shorter, or its alignment is poor (P@1 on the seed dictionary, share of main tokens it can vote for).
WEAKER_THAN_MAIN = 0.9
PROPORTION_METRICS = ("accuracy", "exact_match")
REPLY_LENGTH_RATIO = 2.0
POOR_P_AT_1 = 0.5
POOR_MAIN_COVERAGE = 0.5

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
        kind = "Wilson" if self.metric in PROPORTION_METRICS else "bootstrap"
        lines = [f"{'system':<{width}}  {self.metric:>9}  95% CI ({kind})"]
        for s in self.systems:
            low, high = m.get(f"{s}_{self.metric}_ci_low"), m.get(f"{s}_{self.metric}_ci_high")
            ci = f"[{low:.3f}, {high:.3f}]" if low is not None else "-"
            lines.append(f"{s:<{width}}  {m[f'{s}_{self.metric}']:>9.3f}  {ci}")
        key = f"ensemble_minus_best_{self.metric}"
        if key in m:
            lines.append(f"ensemble - best member ({m['best_member']}): {m[key]:+.3f} "
                         f"[{m[key + '_ci_low']:+.3f}, {m[key + '_ci_high']:+.3f}] "
                         f"(95% paired bootstrap, {m['bootstrap_samples']} resamples, n={m['n']})")
        for aux in [a for a in m.get("aux", "").split(",") if f"compat_{a}_likely_hurts" in m]:
            warm = m.get(f"compat_{aux}_warmup_{self.metric}")
            main_warm = m.get(f"compat_{m['main']}_warmup_{self.metric}")
            warm = (f"; warm-up {self.metric} {warm:.3f} vs main {main_warm:.3f} (n={m['compat_warmup_n']})"
                    if warm is not None else "")
            p_at_1 = m.get(f"compat_{aux}_p_at_1")
            lines.append(f"compatibility {aux}: P@1 {p_at_1 if p_at_1 is None else round(p_at_1, 3)}, main coverage "
                         f"{m[f'compat_{aux}_main_coverage']:.1%}{warm}"
                         + (" -> LIKELY TO HURT" if m[f"compat_{aux}_likely_hurts"] else ""))
        if "ensemble_step_ms" in m and "ensemble_step_vs_slowest" in m:
            lines.append(f"step: ensemble {m['ensemble_step_ms']:.1f} ms = {m['ensemble_step_vs_slowest']:.2f} x "
                         f"the slowest member; gate fired on {m['ensemble_gate_fired_frac']:.1%} of row-steps")
        return "\n".join(lines)


@dataclass
class Run:
    """One system's decoding of the examples: what a later evaluation can reuse instead of decoding again."""

    texts: list[str]
    new_tokens: int
    seconds: float
    stats: dict[str, Any]

    @property
    def step_s(self) -> float:
        return self.seconds / max(self.stats.get("steps", 0), 1)


def _decode(decoder: EvaDecoder, prompts: list[list[str]], stop: list[str], max_new_tokens: int, batch_size: int,
            on_batch: Callable[[EnsembleOutput], None] | None = None) -> Run:
    texts, n_tokens, seconds, stats = [], 0, 0.0, {}
    for start in range(0, len(prompts[0]), batch_size):
        out = decoder.generate([p[start:start + batch_size] for p in prompts], max_new_tokens=max_new_tokens, stop=stop)
        texts += out.texts
        n_tokens += sum(out.new_tokens)
        seconds += out.seconds
        add_stats(stats, out.stats)
        if on_batch is not None:
            on_batch(out)
    return Run(texts, n_tokens, seconds, stats)


def member_options(options: DecodingOptions, n_models: int) -> DecodingOptions:
    """The decoding options with the threads each member gets inside the ensemble (members alone use the same)."""
    return dataclasses.replace(options.decoding(), threads=options.member_threads(n_models))


def decode_members(members: Sequence[Member], task: str, examples: list[dict[str, Any]], options: DecodingOptions,
                   max_new_tokens: int, *, shots: Sequence[dict[str, Any]] = (), batch_size: int = 8,
                   n_models: int | None = None,
                   on_batch: Callable[[str, EnsembleOutput], None] | None = None) -> dict[str, Run]:
    """Each member alone on ``examples`` through the ensemble's step loop (same prompts, stops, greedy rule
    and threads as inside an ensemble of ``n_models``), after a one-token warm-up outside the timings."""
    options = member_options(options, n_models or len(members))
    runs = {}
    for m in members:
        prompts = task_prompts(task, examples, m.tokenizer, m.use_chat_template, list(shots))
        decoder = EvaDecoder((m.model, m.tokenizer), options=options)
        decoder.generate([prompts[:1]], max_new_tokens=1)  # one-time kernel set-up
        runs[m.name] = _decode(decoder, [prompts], task_stops(task, m.use_chat_template), max_new_tokens, batch_size,
                               None if on_batch is None else lambda out, name=m.name: on_batch(name, out))
    return runs


def evaluate_ensemble(members: Sequence[Member], alignments: Sequence[Alignment], task: str,
                      examples: list[dict[str, Any]], options: DecodingOptions, max_new_tokens: int, *,
                      shots: Sequence[dict[str, Any]] = (), batch_size: int = 8, eval_members: bool = True,
                      member_runs: dict[str, Run] | None = None, bootstrap_samples: int = 10000, seed: int = 0,
                      on_batch: Callable[[str, EnsembleOutput], None] | None = None) -> EnsembleReport:
    """Decode ``examples`` with each member alone (``eval_members``; a member in ``member_runs``, decoded
    earlier on the same examples and prompts, is reused) and with the ensemble; score them."""
    metric = get_task(task).metric
    names = [m.name for m in members]
    options = member_options(options, len(members))
    metrics: dict[str, Any] = {"task": task, "n": len(examples), "main": names[0], "aux": ",".join(names[1:]),
                               "align_method": alignments[0].method if alignments else "",
                               "threads_per_member": options.threads}
    for name, a in zip(names[1:], alignments):
        metrics.update({f"align_{name}_{k}": a.stats[k] for k in ALIGN_STATS if k in a.stats})
    runs = dict(member_runs or {}) if eval_members else {}
    todo = [m for m in members if m.name not in runs] if eval_members else []
    runs.update(decode_members(todo, task, examples, options, max_new_tokens, shots=shots, batch_size=batch_size,
                               n_models=len(members), on_batch=on_batch))
    prompts = [task_prompts(task, examples, m.tokenizer, m.use_chat_template, list(shots)) for m in members]
    stops = sorted({s for m in members for s in task_stops(task, m.use_chat_template)})
    ensemble = EvaDecoder((members[0].model, members[0].tokenizer),
                          [(m.model, m.tokenizer) for m in members[1:]], alignments, options=options)
    runs["ensemble"] = _decode(ensemble, prompts, stops, max_new_tokens, batch_size,
                               None if on_batch is None else lambda out: on_batch("ensemble", out))
    systems = [n for n in names if n in runs] + ["ensemble"]
    rows = [{"id": ex["id"], "gold": ex["answer"]} for ex in examples]
    correct: dict[str, list] = {}
    for tag in systems:
        run = runs[tag]
        scores, correct[tag] = score(task, run.texts, examples)
        for row, text, c in zip(rows, run.texts, correct[tag]):
            row.update({f"{tag}_output": text, f"{tag}_extracted": extract_answer(task, text), f"{tag}_correct": c})
        metrics.update({f"{tag}_{metric}": scores[metric], f"{tag}_new_tokens": run.new_tokens,
                        f"{tag}_tokens_per_s": round(run.new_tokens / run.seconds, 3) if run.seconds else 0.0,
                        f"{tag}_step_ms": round(1000 * run.step_s, 2)})
    metrics.update(_ensemble_stats(runs["ensemble"], names[1:]))
    member_steps = [runs[n].step_s for n in systems[:-1]]
    if member_steps:
        metrics["ensemble_speed_vs_members"] = round(sum(member_steps) / runs["ensemble"].step_s, 3)  # > 1: faster than the sum
        metrics["ensemble_step_vs_slowest"] = round(runs["ensemble"].step_s / max(member_steps), 3)  # target <= 1.15
    if any(c is None for c in correct["ensemble"]):  # a corpus-level metric (BLEU): no per-example scores
        metrics.update(_corpus_intervals(systems, {t: runs[t].texts for t in systems},
                                         {t: metrics[f"{t}_{metric}"] for t in systems}, task, examples, metric,
                                         bootstrap_samples, seed))
    else:
        metrics.update(_intervals(systems, correct, metric, bootstrap_samples, seed))
    return EnsembleReport(metrics, rows, systems, metric)


def main_coverage(alignment: Alignment) -> float:
    """The share of main-vocabulary ids that some aux token projects onto (the align stats' value if given)."""
    if "main_coverage" in alignment.stats:
        return float(alignment.stats["main_coverage"])
    cols = alignment.cols[alignment.cols >= 0]
    return cols.unique().numel() / alignment.main_vocab


def _clearly_weaker(aux: float, main: float, n: int, metric: str) -> bool:
    """Is the aux member far weaker than the main one beyond warm-up noise? For a proportion (accuracy,
    exact match) its whole 95% Wilson interval must lie below WEAKER_THAN_MAIN × the main score (2 of 8
    vs 3 of 8 is noise, not evidence); other metrics (BLEU) compare the point values."""
    if metric in PROPORTION_METRICS:
        return wilson_interval(round(aux * n), n)[1] < WEAKER_THAN_MAIN * main
    return aux < WEAKER_THAN_MAIN * main


def check_compatibility(members: Sequence[Member], alignments: Sequence[Alignment], task: str,
                        warmup: list[dict[str, Any]], options: DecodingOptions, max_new_tokens: int, *,
                        batch_size: int = 8) -> tuple[dict[str, Any], list[str]]:
    """Before ensembling: each aux alignment's P@1 and main-vocabulary coverage, each member's score and
    reply length on demonstration-free ``warmup`` examples (dev split: never reported), and a warning
    naming each aux member likely to hurt (SUCCESSORS.md §1d). Returns (``compat_*`` metrics, warnings)."""
    metric = get_task(task).metric
    out: dict[str, Any] = {"compat_warmup_n": len(warmup)}
    warnings = []
    for m, a in zip(members[1:], alignments):
        p_at_1, coverage = a.stats.get("p_at_1"), main_coverage(a)
        rows = a.stats.get("rows_mapped", int((a.cols >= 0).any(dim=1).sum())) / a.aux_vocab
        out.update({f"compat_{m.name}_p_at_1": p_at_1, f"compat_{m.name}_main_coverage": round(coverage, 4),
                    f"compat_{m.name}_rows_mapped_frac": round(rows, 4)})
        if p_at_1 is not None and p_at_1 < POOR_P_AT_1:
            warnings.append(f"{m.name}: poorly aligned (P@1 {p_at_1:.3f} < {POOR_P_AT_1})")
        if coverage < POOR_MAIN_COVERAGE:
            warnings.append(f"{m.name}: its alignment reaches only {coverage:.1%} of the main vocabulary")
    if warmup:
        runs = decode_members(members, task, warmup, options, max_new_tokens, batch_size=batch_size)
        value, length = {}, {}
        for m in members:
            value[m.name] = score(task, runs[m.name].texts, warmup)[0][metric]
            length[m.name] = sum(len(t) for t in runs[m.name].texts) / len(warmup)
            out.update({f"compat_{m.name}_warmup_{metric}": value[m.name],
                        f"compat_{m.name}_reply_chars": round(length[m.name], 1)})
        main = members[0].name
        for m in members[1:]:
            if _clearly_weaker(value[m.name], value[main], len(warmup), metric):
                warnings.append(f"{m.name}: far weaker than the main model {main} on {len(warmup)} warm-up examples "
                                f"({metric} {value[m.name]:.3f} vs {value[main]:.3f})")
            ratio = max(length[m.name], 1.0) / max(length[main], 1.0)
            if not 1 / REPLY_LENGTH_RATIO <= ratio <= REPLY_LENGTH_RATIO:
                warnings.append(f"{m.name}: replies {ratio:.1f}x as long as the main model's (response style differs)")
    for m in members[1:]:
        out[f"compat_{m.name}_likely_hurts"] = any(w.startswith(f"{m.name}:") for w in warnings)
    for w in warnings:
        log.warning("Compatibility: %s; the ensemble may be worse than its best member.", w)
    return out, warnings


def dev_score_weights(scores: Sequence[float]) -> list[float] | None:
    """``linear_sum`` weights of the aux members from every member's dev score (main first): w_m = s_m / Σ s.

    GaC's per-model weighting (``NORM_TYPE: score``, w = score / Σ score; SUCCESSORS.md §1c), with each
    member's accuracy on a few dev examples as its score (our choice: GaC leaves the score to the user);
    the main model gets 1 − Σ aux weights = s_main / Σ s.
    None (equal weights) when every score is 0.
    """
    total = float(sum(scores))
    if total <= 0:
        return None
    return [s / total for s in scores[1:]]


def dev_weights(members: Sequence[Member], task: str, dev: list[dict[str, Any]], options: DecodingOptions,
                max_new_tokens: int, *, shots: Sequence[dict[str, Any]] = (),
                batch_size: int = 8) -> tuple[list[float] | None, dict[str, Any]]:
    """``linear_sum`` aux weights from each member's score on ``dev`` examples (the run's prompt and
    demonstrations; never reported examples), and the ``dev_*`` metrics that record them."""
    metric = get_task(task).metric
    runs = decode_members(members, task, dev, options, max_new_tokens, shots=shots, batch_size=batch_size)
    scores = [score(task, runs[m.name].texts, dev)[0][metric] for m in members]
    weights = dev_score_weights(scores)
    if weights is None:
        log.warning("Every member scored 0 on the %d dev examples: equal linear_sum weights.", len(dev))
    out = {f"dev_{m.name}_{metric}": v for m, v in zip(members, scores)}
    out.update({"dev_n": len(dev), "ensemble_weights": ",".join(f"{w:.4f}" for w in weights) if weights else "equal"})
    return weights, out


def _ensemble_stats(run: Run, aux_names: Sequence[str]) -> dict[str, Any]:
    """Gate, filter and projection shares of the ensemble's run, the aux mass that projected nowhere by name."""
    summary = summarize(run.stats)
    for i, name in enumerate(aux_names):
        summary[f"{name}_unmapped_mass"] = lost = summary.pop(f"aux_unmapped_{i}_mass")
        if lost > UNMAPPED_WARNING:
            log.warning("%.0f%% of aux model %r's top-k probability mass projected nowhere in the main "
                        "vocabulary (tokens without an alignment row): its votes are partly lost. Align "
                        "its whole vocabulary (align_method.aux_vocab_cutoff=null).", 100 * lost, name)
    out = {f"ensemble_{k}": v for k, v in summary.items() if k != "steps"}
    out["ensemble_generate_s"] = round(run.seconds, 3)
    return out


def _corpus_intervals(systems: list[str], texts: dict[str, list[str]], values: dict[str, float], task: str,
                      examples: list[dict[str, Any]], metric: str, resamples: int, seed: int) -> dict[str, Any]:
    """A corpus-level metric (BLEU): per system and for ensemble − best member, a bootstrap over examples of the
    corpus metric (the same resampled examples for every system), from per-example sufficient statistics."""
    stats = {s: corpus_statistics(task, texts[s], examples) for s in systems}
    if any(v is None for v in stats.values()):
        return {}
    from_sums = stats["ensemble"][1]
    out: dict[str, Any] = {}
    for s in systems:
        d = paired_bootstrap_corpus(stats[s][0], None, from_sums, resamples=resamples, seed=seed)
        out.update({f"{s}_{metric}_ci_low": round(d.low, 4), f"{s}_{metric}_ci_high": round(d.high, 4)})
    members = systems[:-1]
    if members:
        best = max(members, key=lambda s: values[s])  # the main on ties
        d = paired_bootstrap_corpus(stats["ensemble"][0], stats[best][0], from_sums, resamples=resamples, seed=seed)
        out.update(_difference_to_best(best, d, metric))
    return out


def _difference_to_best(best: str, d: PairedDifference, metric: str) -> dict[str, Any]:
    """The metrics.json keys of ensemble − best member and its interval."""
    key = f"ensemble_minus_best_{metric}"
    return {"best_member": best, key: round(d.diff, 4), f"{key}_ci_low": round(d.low, 4),
            f"{key}_ci_high": round(d.high, 4), "bootstrap_samples": d.resamples}


def _intervals(systems: list[str], correct: dict[str, list], metric: str, resamples: int, seed: int) -> dict[str, Any]:
    """Wilson intervals per system and the paired bootstrap of ensemble − best member (per-example metrics)."""
    out: dict[str, Any] = {}
    for s in systems:
        low, high = wilson_interval(sum(bool(c) for c in correct[s]), len(correct[s]))
        out.update({f"{s}_{metric}_ci_low": round(low, 4), f"{s}_{metric}_ci_high": round(high, 4)})
    members = systems[:-1]
    if members:
        best = max(members, key=lambda s: sum(bool(c) for c in correct[s]))  # the first (main) on ties
        d = paired_bootstrap([float(bool(c)) for c in correct["ensemble"]], [float(bool(c)) for c in correct[best]],
                             resamples=resamples, seed=seed)
        out.update(_difference_to_best(best, d, metric))
    return out
