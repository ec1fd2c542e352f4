"""Implicit knowledge fusion (FuseChat-3.0 / WRPO, ICLR 2025): sample, score, SFT, preference-optimise.

Explicit fusion (:mod:`fusionlab.distill.pipeline`) distils the sources' token distributions, which
needs the vocabularies aligned. Implicit fusion needs only the sources' *text*:

1. :func:`sample_responses`: every source and the pivot answer each training prompt ``samples``
   times (each in its own chat format; FuseChat-3.0's T = 0.8, top-p = 0.95);
2. :func:`score_responses`: task correctness where the prompt has a gold answer (the task's own
   extractor), else the length-normalised log-likelihood of the response under a scorer model
   (a source; FuseChat-3.0 used a reward model, which does not ship here);
3. :func:`select`: per prompt the best response (SFT), and a preference pair — DPO: best vs worst
   over all models; WRPO: best source response y_ws, best pivot response y_wt, worst pivot response y_l;
4. a seeded split of the prompts (``sft_fraction`` SFT, the rest preference, as FuseChat-3.0's 4:6),
   SFT of the pivot on the best responses (the distill fit with λ = 1), then DPO / WRPO
   (:mod:`fusionlab.distill.preference`) with the SFT model, frozen, as the reference.

:func:`implicit_fusion` runs it all into a run dir; each stage is reused when its output exists.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

SCORERS = ("auto", "correct", "loglik")
FUSION_KINDS = ("explicit", "implicit")  # distill.mode


@dataclass
class ImplicitConfig:
    """Settings of ``distill.mode=implicit`` (the ``distill.implicit`` node); defaults are CPU-sized."""

    task: str | None = None  # a shipped task gives prompts + gold answers (scorer: correct); null: distill.data
    prompts: int | None = None  # training prompts (null: every training conversation / 64 task examples)
    samples: int = 2  # responses per prompt and model
    max_new_tokens: int = 64
    temperature: float = 0.8  # FuseChat-3.0's sampling
    top_p: float = 0.95
    batch_size: int = 8  # prompts per generate call
    scorer: str = "auto"  # auto: correct with a task, else loglik | correct | loglik
    scorer_model: str | None = None  # loglik: the source that scores (null: the first source)
    sft_fraction: float = 0.4  # of the prompts for SFT (best response); the rest give preference pairs
    loss: str = "dpo"  # dpo | wrpo
    beta: float = 0.1
    alpha: float = 0.1  # WRPO: final weight of the source's best response
    alpha_schedule: str = "linear"  # linear (0 → alpha over the fit) | constant
    length_normalized: bool = False  # LN-DPO: log-ratios divided by the response length
    preference_steps: int | None = None  # null: trainer.max_steps
    preference_lr: float = 1.0e-6  # FuseChat-3.0 DPO lr for 1B-3B targets
    preference_batch_size: int = 2

    def __post_init__(self) -> None:
        from fusionlab.tasks import get_task

        if self.task is not None:
            get_task(self.task)
        if self.scorer not in SCORERS:
            raise FusionlabError(f"Unknown distill.implicit.scorer {self.scorer!r}; use one of {list(SCORERS)}.")
        if self.scorer == "correct" and self.task is None:
            raise FusionlabError("distill.implicit.scorer=correct needs gold answers: set distill.implicit.task "
                                 "(e.g. gsm8k), or use scorer=loglik.")
        for key, low in (("samples", 1), ("max_new_tokens", 1), ("batch_size", 1),
                         ("preference_batch_size", 1)):
            if getattr(self, key) < low:
                raise FusionlabError(f"distill.implicit.{key}={getattr(self, key)} must be >= {low}.")
        for key in ("prompts", "preference_steps"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise FusionlabError(f"distill.implicit.{key}={getattr(self, key)} must be >= 1 (or null).")
        if not 0.0 < self.sft_fraction < 1.0:
            raise FusionlabError(f"distill.implicit.sft_fraction={self.sft_fraction} must lie in (0, 1): both the "
                                 "SFT and the preference stage need prompts.")
        if not (self.temperature > 0 and 0 < self.top_p <= 1 and self.preference_lr > 0):
            raise FusionlabError(f"distill.implicit: temperature={self.temperature} and preference_lr="
                                 f"{self.preference_lr} must be > 0, top_p={self.top_p} in (0, 1].")
        from fusionlab.distill.preference import check_preference_options  # lazy: it imports lightning

        check_preference_options(self.loss, self.beta, self.alpha, self.alpha_schedule)

    @property
    def uses_correctness(self) -> bool:
        return self.scorer == "correct" or (self.scorer == "auto" and self.task is not None)


# ------------------------------------------------------------------------------------------- prompts
def task_items(task: str, n: int | None, seed: int, exclude: set = frozenset()) -> list[dict]:
    """Training prompts of a task: a seeded sample of ``n`` examples (default 64), never one in ``exclude``
    (the examples the run's held-out task evaluation scores)."""
    from fusionlab.tasks import build_messages, demo_answer, get_task, load_examples, select_examples

    pool = [ex for ex in load_examples(task) if ex["id"] not in exclude]
    if not pool:
        raise FusionlabError(f"Task {task!r} has no example left for distill.implicit after the held-out task "
                             "evaluation's examples (distill.eval.task_limit) are set aside.")

    def item(ex):
        messages, prefix = build_messages(task, ex)
        return {"id": f"{get_task(task).name}-{ex['id']}", "messages": messages, "prefix": prefix,
                "gold": demo_answer(task, ex), "example": ex}
    return [item(ex) for ex in select_examples(pool, n or 64, seed, shuffle=True)]


def conversation_items(conversations: list[dict]) -> list[dict]:
    """Each conversation's first exchange: the messages up to the first assistant turn, and that turn (gold)."""
    out = []
    for c in conversations:
        msgs = c["messages"]
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant" and m["content"]), None)
        if first is None:
            raise FusionlabError(f"Conversation {c['id']!r} has no assistant turn; implicit fusion needs a prompt "
                                 "and its reference response.")
        out.append({"id": c["id"], "messages": msgs[:first], "prefix": "", "gold": msgs[first]["content"],
                    "example": None})
    return out


# ------------------------------------------------------------------------------------------- sample + score
def sample_responses(model, tokenizer, spec, items: list[dict], ic: ImplicitConfig, seed: int) -> list[list[str]]:
    """``ic.samples`` sampled responses per item, each prompt in the model's own format."""
    from fusionlab.models.chat import render_prompt
    from fusionlab.models.generation import generate

    prompts = [render_prompt(tokenizer, it["messages"], use_chat_template=spec.use_chat_template,
                             assistant_prefix=it["prefix"]) for it in items]
    out: list[list[str]] = [[] for _ in items]
    for s in range(ic.samples):
        res = generate(model, tokenizer, prompts, max_new_tokens=ic.max_new_tokens, batch_size=ic.batch_size,
                       do_sample=True, temperature=ic.temperature, top_p=ic.top_p, seed=seed + s, progress=False)
        for i, text in enumerate(res.texts):  # the response includes the prefix the prompt ended with
            out[i].append(f"{items[i]['prefix']} {text.strip()}".strip())
    return out


@torch.no_grad()
def loglik_scores(model, tokenizer, spec, items: list[dict], responses: list[list[str]]) -> list[list[float]]:
    """Mean log-probability per response token under ``model`` (the response after the prompt, in its format)."""
    from fusionlab.models.chat import render_prompt
    from fusionlab.models.generation import needs_special_tokens

    device = next(model.parameters()).device
    scores = []
    for it, resp in zip(items, responses):
        prompt = render_prompt(tokenizer, it["messages"], use_chat_template=spec.use_chat_template)
        add = needs_special_tokens(tokenizer, prompt)
        p_ids = tokenizer(prompt, add_special_tokens=add)["input_ids"]
        row = []
        for r in resp:
            r_ids = tokenizer(r, add_special_tokens=False)["input_ids"]
            if not r_ids:
                row.append(-math.inf)
                continue
            ids = torch.tensor([p_ids + r_ids], device=device)
            logp = torch.log_softmax(model(input_ids=ids).logits[0, len(p_ids) - 1:-1].float(), -1)
            row.append(float(logp.gather(-1, ids[0, len(p_ids):, None]).mean()))
        scores.append(row)
    return scores


def correctness_scores(task: str, items: list[dict], responses: list[list[str]]) -> list[list[float]]:
    """1.0 for a response whose extracted answer equals the gold answer (the task's own metric), else 0.0."""
    from fusionlab.tasks import score

    out = []
    for it, resp in zip(items, responses):
        _, correct = score(task, resp, [it["example"]] * len(resp))
        out.append([1.0 if c else 0.0 for c in correct])
    return out


def select(scores: dict[str, list[float]], pivot: str, loss: str = "dpo",
           correctness: bool = False) -> dict[str, tuple[str, int]] | None:
    """The responses one prompt contributes, as (model, sample index): ``best`` (SFT) and the pair.

    ``scores`` maps model → its responses' scores (the pivot among them). DPO: chosen = best over all,
    rejected = worst over all; WRPO: source = best source response, chosen = best pivot response,
    rejected = worst pivot response. Ties go to the first in ``scores`` order. None when nothing
    separates the pair (equal scores; with correctness, the chosen must be right and the rejected wrong).
    """
    flat = [(s, m, i) for m, row in scores.items() for i, s in enumerate(row) if math.isfinite(s)]
    if not flat:
        return None
    best_s, best_m, best_i = max(flat, key=lambda x: x[0])  # max/min keep the first of equal scores
    out: dict[str, tuple[str, int]] = {"best": (best_m, best_i)}
    if loss == "wrpo":
        own = [x for x in flat if x[1] == pivot]
        src = [x for x in flat if x[1] != pivot]
        if not own or not src:
            return out
        (cs, cm, ci), (rs, rm, ri), (ss, sm, si) = max(own, key=lambda x: x[0]), min(own, key=lambda x: x[0]), \
            max(src, key=lambda x: x[0])
        ok = ss > rs and cs >= rs and (cm, ci) != (rm, ri)
    else:
        (cs, cm, ci), (rs, rm, ri) = (best_s, best_m, best_i), min(flat, key=lambda x: x[0])
        ok = cs > rs
    if correctness:
        ok = ok and cs > 0.5 and rs < 0.5
    if ok:
        out.update(chosen=(cm, ci), rejected=(rm, ri))
        if loss == "wrpo":
            out["source"] = (sm, si)
    return out


# ------------------------------------------------------------------------------------------- records
def encode_response(tokenizer, messages: list[dict], response: str, max_length: int) -> dict[str, np.ndarray]:
    """Prompt + response in the pivot's template: ids and the mask of response tokens (end of turn included)."""
    from fusionlab.distill.representations import prepare_texts, tokenize_with_spans

    conv = {"id": "", "messages": [*messages, {"role": "assistant", "content": response}]}
    text = prepare_texts(tokenizer, [conv], max_length)[0]
    enc = tokenize_with_spans(tokenizer, text["text"], text["spans"][-1:], add_bos=False)
    return {"input_ids": enc["input_ids"].astype(np.int64), "assistant": enc["assistant"]}


def clm_record(rid: str, enc: dict[str, np.ndarray]) -> dict[str, Any]:
    """A fused-format record whose only target is the next token (one-hot): the distill fit's fusion term
    then equals its CLM term, and λ = 1 makes the fit plain SFT."""
    ids = enc["input_ids"]
    nxt = np.full((1, len(ids), 1), -1, dtype=np.int64)
    nxt[0, :-1, 0] = ids[1:]
    return {"id": rid, "input_ids": ids, "assistant": enc["assistant"], "target_ids": nxt,
            "target_logits": np.where(nxt >= 0, 0.0, -np.inf).astype(np.float32), "ce": np.zeros(1, np.float32)}


# ------------------------------------------------------------------------------------------- pipeline
def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _train_items(dc, seed: int) -> tuple[list[dict], list[dict]]:
    """(training prompts, held-out conversation ids): the split is the explicit path's
    (:func:`~fusionlab.distill.conversations.split_conversations`), so both modes score the same conversations."""
    from fusionlab.distill.conversations import load_conversations, split_conversations

    train, heldout, dev = split_conversations(load_conversations(dc.data.path), dc.data.heldout, dc.data.heldout_seed,
                                              dc.data.dev_size)
    heldout = dev if dc.data.dev else heldout
    ic = dc.implicit
    if ic.task:
        exclude: set = set()
        if dc.eval.task is not None:
            from fusionlab.tasks import get_task, task_inputs

            if get_task(dc.eval.task).data_file == get_task(ic.task).data_file:  # same examples: keep them apart
                exclude = {ex["id"] for ex in task_inputs(dc.eval.task_config()).examples}
        return task_items(ic.task, ic.prompts, seed, exclude), heldout
    return conversation_items(dc.data.train_slice(train))[: ic.prompts or None], heldout


def implicit_fusion(dc, make_trainer: Callable[[Path], Any], output_dir: Path, *, optimizer: Callable | None = None,
                    scheduler: Callable | None = None, seed: int = 0) -> dict[str, Any]:
    """Sample → score → select → SFT → DPO/WRPO of ``dc.pivot`` into ``output_dir``; then the held-out scores
    (:mod:`fusionlab.distill.evaluation`) of the pivot, the SFT model, the fused model and, with
    ``dc.baseline == 'clm'``, the pivot SFT'd on the original (gold) responses for as many steps."""
    from fusionlab.distill.evaluation import HeldoutScores, HeldoutSet, paired_difference
    from fusionlab.distill.module import throughput_metrics
    from fusionlab.distill.pipeline import FusedData, fit, scored_texts, split_name
    from fusionlab.distill.preference import PreferenceDataModule, PreferenceModule
    from fusionlab.distill.representations import resolve_derived_sources
    from fusionlab.io import atomic_dir, write_json
    from fusionlab.models import load_model

    dc = resolve_derived_sources(dc)
    ic: ImplicitConfig = dc.implicit
    out = Path(output_dir)
    work = out / "implicit"
    work.mkdir(parents=True, exist_ok=True)
    train, heldout = _train_items(dc, seed)
    metrics: dict[str, Any] = {"implicit/train_prompts": len(train)}
    write_json(out / "split.json", {"train": [t["id"] for t in train], "heldout": [h["id"] for h in heldout]})

    # 1-2. sample from every model (one in memory at a time), then score; both cached in <run>/implicit
    specs = {"pivot": dc.pivot, **dc.sources}
    t0 = time.perf_counter()
    responses: dict[str, list[list[str]]] = {}
    for name, spec in specs.items():
        path = work / f"samples-{name}.json"
        if (cached := _load(path)) is None:
            model, tok = load_model(spec)
            cached = sample_responses(model, tok, spec, train, ic, seed)
            write_json(path, cached)
            del model
        responses[name] = cached
    metrics["time/sampling_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if (scores := _load(work / "scores.json")) is None:
        if ic.uses_correctness:
            scores = {n: correctness_scores(ic.task, train, r) for n, r in responses.items()}
        else:
            scorer = ic.scorer_model or next(iter(dc.sources))  # a known model: checked by DistillConfig
            model, tok = load_model(specs[scorer])
            scores = {n: loglik_scores(model, tok, specs[scorer], train, r) for n, r in responses.items()}
            del model
        write_json(work / "scores.json", scores)  # (an unscorable, empty response: -inf, written as null)
    scores = {n: [[-math.inf if v is None else float(v) for v in row] for row in rows] for n, rows in scores.items()}
    metrics["time/scoring_s"] = round(time.perf_counter() - t0, 2)
    for n in specs:
        flat = [v for row in scores[n] for v in row if math.isfinite(v)]
        metrics[f"implicit/score_mean/{n}"] = float(np.mean(flat)) if flat else float("nan")

    # 3-4. selection and the seeded SFT / preference split of the prompts
    choice = [select({n: scores[n][i] for n in specs}, "pivot", ic.loss, ic.uses_correctness)
              for i in range(len(train))]
    order = np.random.default_rng(seed + 1).permutation(len(train)).tolist()
    n_sft = max(1, int(round(ic.sft_fraction * len(train))))
    sft_idx, pref_idx = order[:n_sft], order[n_sft:]
    for n in specs:  # where the best responses come from
        metrics[f"implicit/best_from/{n}"] = sum(1 for c in choice if c and c["best"][0] == n)
    pivot_model, tok = load_model(dc.pivot)
    L_ = dc.data.max_length

    def enc(i: int, who: tuple[str, int]) -> dict[str, np.ndarray]:
        return encode_response(tok, train[i]["messages"], responses[who[0]][i][who[1]], L_)

    def usable(e: dict[str, np.ndarray]) -> bool:  # a response that survives the max_length cut
        return bool(e["assistant"][1:].any())

    sft_records = [clm_record(train[i]["id"], e) for i in sft_idx if choice[i]
                   if usable(e := enc(i, choice[i]["best"]))]
    pairs = [p for i in pref_idx if choice[i] and "chosen" in choice[i]
             for p in [{"id": train[i]["id"], **{role: enc(i, choice[i][role])
                                                 for role in ("chosen", "rejected", "source") if role in choice[i]}}]
             if all(usable(v) for k, v in p.items() if k != "id")]
    metrics.update({"implicit/sft_samples": len(sft_records), "implicit/pairs": len(pairs)})
    if not sft_records:
        raise FusionlabError("Implicit fusion found no usable SFT response (every sample empty, unscored or cut "
                             "off by distill.data.max_length); raise distill.implicit.samples or max_length.")
    write_json(work / "selection.json", {"sft": [r["id"] for r in sft_records], "pairs": [p["id"] for p in pairs]})

    held, dropped = scored_texts(dc, tok, heldout)
    metrics[f"{split_name(dc)}/dropped_after_cut"] = dropped
    scores_out = HeldoutScores(split_name(dc))
    chat = dc.pivot.use_chat_template
    scores_out.score("pivot", pivot_model, tok, held, dc.eval, chat, seed)

    # 5. SFT on the best responses: the distill fit with lam = 1 (plain CLM on the response tokens)
    sft_dc = dataclasses.replace(dc, lam=1.0, pairwise_source=None, fusion_mode="min_ce")
    sft_metrics = fit(sft_dc, FusedData(sft_records, pivot_model, tok, [], {}, held), make_trainer(out / "sft"),
                      out / "sft", optimizer=optimizer, scheduler=scheduler, seed=seed, eval_name="sft")
    metrics.update({f"sft/{k}": v for k, v in sft_metrics.items() if isinstance(v, (int, float, bool))})
    policy = pivot_model  # trained in place by the SFT fit
    reference = copy.deepcopy(policy).eval()
    scores_out.score("sft", reference, tok, held, dc.eval, chat, seed)

    # 6. DPO / WRPO against the frozen SFT model
    trainer = make_trainer(out / "preference")
    if ic.preference_steps:
        trainer.fit_loop.epoch_loop.max_steps = ic.preference_steps
    opt = functools.partial(optimizer or torch.optim.AdamW, lr=ic.preference_lr)
    module = PreferenceModule(policy.train(), reference, optimizer=opt, scheduler=scheduler, loss=ic.loss,
                              beta=ic.beta, alpha=ic.alpha, alpha_schedule=ic.alpha_schedule,
                              length_normalized=ic.length_normalized)
    module.tokenizer, module.pivot_spec = tok, dc.pivot  # for callbacks that decode or reload the pivot
    module.heldout = HeldoutSet(split_name(dc), held, dc.eval, "fused", chat, seed)  # for HeldoutEval
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=PreferenceDataModule(pairs, ic.preference_batch_size, seed, pad),
                ckpt_path=dc.resume_checkpoint(out / "preference"))
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if hasattr(v, "item") and v.numel() == 1}
    metrics.update({f"final/{k.replace('/', '_')}": v for k, v in final.items()})
    metrics.update({"preference/steps": int(trainer.global_step), "preference/seconds": time.perf_counter() - t0,
                    **throughput_metrics(module, "preference")})
    del reference, module
    if dc.export_model and trainer.is_global_zero:
        with atomic_dir(out / "model", overwrite=True) as tmp:
            policy.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        metrics["model_dir"] = str(out / "model")
    scores_out.score("fused", policy, tok, held, dc.eval, chat, seed)

    # 7. the CLM baseline: the pivot SFT'd on the original responses of the same prompts, as many steps
    if dc.baseline == "clm":
        del policy
        gold = [clm_record(t["id"], e) for t in train
                if usable(e := encode_response(tok, t["messages"], t["gold"], L_))]
        base_model, _ = load_model(dc.pivot)
        bt = make_trainer(out / "baseline_clm")
        bt.fit_loop.epoch_loop.max_steps = int(sft_metrics["fit/steps"]) + int(trainer.global_step)
        bm = fit(dataclasses.replace(sft_dc, export_model=False), FusedData(gold, base_model, tok, [], {}, held), bt,
                 out / "baseline_clm", optimizer=optimizer, scheduler=scheduler, seed=seed, eval_name="clm")
        metrics.update({f"baseline/{k}": v for k, v in bm.items() if isinstance(v, (int, float, bool))})
        scores_out.score("clm", base_model, tok, held, dc.eval, chat, seed)
    metrics.update(scores_out.metrics(seed))
    split = scores_out.split
    d = paired_difference(scores_out.ce["fused"], scores_out.ce["sft"], seed)  # what the preference stage added
    metrics.update({f"{split}/ce_diff/fused_minus_sft": d.diff, f"{split}/ce_diff/fused_minus_sft_low": d.low,
                    f"{split}/ce_diff/fused_minus_sft_high": d.high})
    write_json(work / "heldout_ce.json", scores_out.ce)
    return metrics
