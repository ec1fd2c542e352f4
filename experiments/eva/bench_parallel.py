"""Benchmark: ensemble step time vs the sum and the max of its members' step times, side by side in
one run, for EVA with members in turn and in parallel, union top-k (UniTE) and the confidence gate.

    python experiments/eva/bench_parallel.py --batch 4 --new-tokens 32 --repeats 3 --threads 1

Every configuration decodes the same AddSub prompts (each model in its own format) with EOS ignored,
so every run takes exactly --new-tokens steps; configurations are interleaved within each repeat
(A alone, B alone, EVA in turn, EVA parallel, union, gate, ...) so slow drifts of a shared machine's
load hit them alike; medians over the repeats. Members alone use the same threads as inside the
ensemble. The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from fusionlab.align import align
from fusionlab.ensemble import EvaDecoder
from fusionlab.ensemble.decoder import eos_ids
from fusionlab.models import cache_dir, load_model
from fusionlab.tasks import load_examples, task_prompts


def step_ms(decoder: EvaDecoder, prompts, new_tokens: int) -> tuple[float, dict]:
    decoder.eos = set()  # every configuration runs exactly new_tokens steps
    out = decoder.generate(prompts, max_new_tokens=new_tokens)
    return 1000 * out.seconds / out.stats["steps"], out.stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per member")
    ap.add_argument("--gate-threshold", type=float, nargs="+", default=[0.5], help="one gate run per threshold")
    ap.add_argument("--aux-vocab-cutoff", type=int, default=0, help="0: the full aux vocabulary (the default)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    print("load before:", os.getloadavg(), os.popen("uptime").read().strip(), flush=True)
    names = ("smollm2_135m", "gemma3_270m")
    members = [load_model({"name": n, "source": "embedded", "path": n, "device": args.device}) for n in names]
    # the cache entry the ensemble job uses (its key includes the aux model's end-of-turn ids)
    alignment = align(*members[1], *members[0], "vecmap_csls", cache_dir=cache_dir() / "align",
                      aux_vocab_cutoff=args.aux_vocab_cutoff or None, aux_eos_ids=sorted(eos_ids(*members[1])))
    examples = load_examples("addsub", limit=args.batch)
    prompts = [task_prompts("addsub", examples, members[0][1], True), task_prompts("addsub", examples, members[1][1], False)]
    opts = {"threads": args.threads, "topk": 320, "drop": 5}
    configs = {
        names[0]: lambda: EvaDecoder(members[0], **opts),
        names[1]: lambda: EvaDecoder(members[1], **opts),
        "eva_in_turn": lambda: EvaDecoder(members[0], [members[1]], [alignment], parallel=False, **opts),
        "eva_parallel": lambda: EvaDecoder(members[0], [members[1]], [alignment], **opts),
        "union_parallel": lambda: EvaDecoder(members[0], [members[1]], [alignment], candidates="union", **opts),
        **{f"gate_{t}": (lambda t=t: EvaDecoder(members[0], [members[1]], [alignment], gate="confidence",
                                                gate_threshold=t, **opts)) for t in args.gate_threshold},
        # the same gate with members in turn: the aux model runs only at fired steps (lazy catch-up)
        **{f"gate_{t}_in_turn": (lambda t=t: EvaDecoder(members[0], [members[1]], [alignment], gate="confidence",
                                                        gate_threshold=t, parallel=False, **opts))
           for t in args.gate_threshold},
    }
    def prompts_for(name: str):
        return prompts[names.index(name)] if name in names else prompts

    for name, make in configs.items():  # warm-up: one-time kernel set-up outside the timings
        make().generate(prompts_for(name), max_new_tokens=2)
    times: dict[str, list[float]] = {k: [] for k in configs}
    gate_stats = {}
    for rep in range(args.repeats):
        for name, make in configs.items():
            ms, stats = step_ms(make(), prompts_for(name), args.new_tokens)
            times[name].append(ms)
            if name.startswith("gate"):
                gate_stats.update({f"{name}_fired_frac": stats["ensembled_row_steps"] / stats["row_steps"],
                                   f"{name}_aux_forward_frac": stats["aux_forward_steps"] / stats["steps"]})
            print(f"repeat {rep} {name}: {ms:.1f} ms/step (load {os.getloadavg()[0]:.2f})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    a, b = med[names[0]], med[names[1]]
    result = {"batch": args.batch, "new_tokens": args.new_tokens, "threads_per_member": args.threads,
              "step_ms": {k: round(v, 1) for k, v in med.items()},
              "sum_of_members_ms": round(a + b, 1), "max_of_members_ms": round(max(a, b), 1),
              **{f"{k}_vs_sum": round(med[k] / (a + b), 3) for k in configs if k not in names},
              **{f"{k}_vs_slowest": round(med[k] / max(a, b), 3) for k in configs if k not in names},
              **{f"{k}_vs_main_alone": round(med[k] / a, 3) for k in configs if k.startswith("gate")},
              **{k: round(v, 4) for k, v in gate_stats.items()},
              "load_after": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
