"""Benchmark: tokens/s of each member alone, the fusionlab EVA ensemble, and a reference-style
loop (no KV cache, full prompt re-tokenised every step, batch 1), side by side in one run.

    python experiments/eva/bench_eva.py --new-tokens 128 [--batch 1] [--device cuda]

Member step times come from the same KV-cached step loop the ensemble uses (one model each),
so "overhead" = ensemble time / sum of member times - 1.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fusionlab.align import align
from fusionlab.ensemble import EvaDecoder
from fusionlab.ensemble.decoder import eos_ids
from fusionlab.models import cache_dir, load_model

PROMPT = "Question: Joan found 70 seashells on the beach. She gave Sam some of her seashells. She has 27 seashells left. How many seashells did she give to Sam?\nAnswer: Let's think step by step."


def reference_loop(main, aux, alignment, prompt, n, topk=320, drop=5):
    """EVA reference semantics: re-tokenise and re-run full prompts every step, models one by one."""
    (m, t), (a, at) = main, aux
    sparse = alignment.to_sparse().t().coalesce()  # main × aux, like the reference's spmm
    p_main, p_aux = prompt, prompt
    for _ in range(n):
        ids = t(p_main, return_tensors="pt").input_ids.to(m.device)
        lm = m(input_ids=ids).logits[:, -1].float()
        lm = F.softmax(lm.masked_fill(lm < lm.topk(topk)[0][..., -1, None], -float("inf")), -1)
        ids = at(p_aux, return_tensors="pt").input_ids.to(a.device)
        la = a(input_ids=ids).logits[:, -1].float()
        la = F.softmax(la.masked_fill(la < la.topk(topk)[0][..., -1, None], -float("inf")), -1)
        la = torch.sparse.mm(sparse.to(la.device), la.t()).t()
        vs = [la, lm]
        keep = [v for i, v in enumerate(vs) if any(v.argmax().item() in w.topk(drop).indices for j, w in enumerate(vs) if j != i)]
        nxt = torch.stack(keep or vs).mean(0).argmax(-1).item()
        text = t.convert_tokens_to_string([t.convert_ids_to_tokens(nxt)])
        p_main += text
        p_aux += text


class _Printing(dict):
    """Print every figure as soon as it is measured, so an interrupted run still reports."""

    def __setitem__(self, k, v):
        super().__setitem__(k, v)
        print(f"{k}: {v}", flush=True)

    def update(self, *a, **kw):
        for k, v in dict(*a, **kw).items():
            self[k] = v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--aux-vocab-cutoff", type=int, default=0, help="0: the full aux vocabulary (the default)")
    ap.add_argument("--reference-tokens", type=int, default=0,
                    help="run the no-cache loop for this many tokens only (0: --new-tokens); its tok/s is then "
                         "an over-estimate at --new-tokens (its cost per token grows with the context)")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    members = [load_model({"name": n, "source": "embedded", "path": n, "device": args.device})
               for n in ("smollm2_135m", "gemma3_270m")]
    start = time.perf_counter()
    al = align(*members[1], *members[0], "vecmap_csls", cache_dir=cache_dir() / "align",
               aux_vocab_cutoff=args.aux_vocab_cutoff or None,
               aux_eos_ids=sorted(eos_ids(*members[1])), rebuild=False)
    res = _Printing()
    res["loadavg_start"] = [round(x, 2) for x in os.getloadavg()]
    res.update({"align_s_this_run": round(time.perf_counter() - start, 2), "align_build_s": al.stats.get("build_s"),
           "align_cache_hit": al.stats.get("cache_hit"), "p_at_1": al.stats.get("p_at_1")})
    prompts = [PROMPT] * args.batch
    n = args.new_tokens
    # members in turn with --threads each (this benchmark's reference point is 1/Σ member step times;
    # bench_parallel.py measures members in parallel)
    opts = {"topk": 320, "threads": args.threads or None, "parallel": False}
    for mem in members:  # warm-up: one-time kernel/allocator set-up must not be charged to the first run
        d = EvaDecoder(mem, **opts)
        d.generate(prompts, max_new_tokens=2)
    # Members alone and the ensemble, interleaved `--repeats` times (A, B, ensemble, A, B, ...):
    # on a shared machine the load drifts within minutes, so one run of each is not comparable.
    # Per configuration the median of the repeats is reported.
    runs = {"smollm2_135m": [], "gemma3_270m": [], "ensemble": []}
    solo = [EvaDecoder(mem, **opts) for mem in members]
    ens = EvaDecoder(members[0], [members[1]], [al], drop=5, **opts)
    for d in (*solo, ens):
        d.eos = set()
    for rep in range(args.repeats):
        for name, d in zip(runs, (*solo, ens)):
            out = d.generate(prompts if d is not ens else [prompts, prompts], max_new_tokens=n)
            runs[name].append(out.seconds)
            print(f"repeat {rep} {name}: {n * args.batch / out.seconds:.2f} tok/s  load {os.getloadavg()[0]:.2f}",
                  flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    for k, v in med.items():
        res[f"{k}_tok_s"] = round(n * args.batch / v, 2)
    member_sum = med["smollm2_135m"] + med["gemma3_270m"]
    res["ensemble_overhead"] = round(med["ensemble"] / member_sum - 1, 3)
    res["ensemble_speed_vs_members"] = round(member_sum / med["ensemble"], 3)  # target >= 0.85
    # the same ratio per repeat (members and ensemble measured back to back)
    res["ensemble_speed_vs_members_per_repeat"] = [round((a + b) / e, 3) for a, b, e in zip(*runs.values())]
    res["loadavg_after_ensemble"] = [round(x, 2) for x in os.getloadavg()]
    if not args.skip_reference:
        n_ref = args.reference_tokens or n
        t0 = time.perf_counter()
        reference_loop(members[0], members[1], al, PROMPT, n_ref)
        res["reference_tokens"] = n_ref
        res["reference_loop_tok_s"] = round(n_ref / (time.perf_counter() - t0), 3)
        # throughput (the reference can only run batch 1) and per sequence (equal at --batch 1)
        res["speedup_vs_reference"] = round(res["ensemble_tok_s"] / res["reference_loop_tok_s"], 2)
        res["speedup_vs_reference_per_sequence"] = round(res["ensemble_tok_s"] / args.batch / res["reference_loop_tok_s"], 2)
    res.update(new_tokens=n, batch=args.batch, device=args.device, threads=torch.get_num_threads(),
               loadavg_end=[round(x, 2) for x in os.getloadavg()])
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
