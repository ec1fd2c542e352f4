"""Compute-only: fusionlab's new merge methods vs mergekit's own method objects on SmolLM2-sized tensors.

The end-to-end benchmark (bench_vs_mergekit.py) times whole merges in fresh processes; on a shared,
oversubscribed CPU its seconds swing 10x with the other jobs. This one runs both implementations of
each method in ONE process on the same in-memory tensors, interleaved (mergekit, fusionlab, mergekit,
...), and reports the best of ``--repeats`` per tool, their ratio and whether the outputs are
bit-equal (peak memory: bench_vs_mergekit.py, whose RSS does not depend on the load). Tensors:
SmolLM2-135M's embedding (49152 x 576) and one MLP matrix (1536 x 576) shapes, a random base and
perturbed copies (base + 0.01·std·N(0, 1)).

    python experiments/merge/bench_new_methods.py --repeats 3 --json experiments/merge/bench_new_methods.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def mergekit_call(name: str, tensors: list[torch.Tensor], base: bool, parameters: dict):
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    method = registry.get(name)
    group = TensorGroup.from_tensors(tensors, base_index=0 if base else None, name="t")
    return lambda: method([group], parameters=parameters)[0]


def fusionlab_call(name: str, tensors: list[torch.Tensor], base: bool, parameters: dict):
    from fusionlab.merge import get_method

    m = get_method(name)
    n = len(tensors) - (1 if base else 0)
    shared = {p.name: parameters.get(p.name, p.default) for p in m.parameters if not p.per_model}
    per_model = [{p.name: (parameters[p.name][i] if isinstance(parameters.get(p.name), list) else
                           parameters.get(p.name, p.default)) for p in m.parameters if p.per_model} for i in range(n)]
    gen = torch.Generator().manual_seed(0) if m.random else None
    return lambda: m.apply(tensors[0] if base else None, tensors[1:] if base else tensors, shared, per_model, gen)


CASES = {  # name: (inputs incl. base, the base is input 0, parameters)
    "nuslerp": (3, True, {"weight": [1.0, 0.5]}),
    "multislerp": (4, True, {"weight": [1.0, 0.5, 0.5]}),
    "karcher": (3, False, {}),
    "nearswap": (2, True, {"t": 0.001}),
    "arcee_fusion": (2, True, {}),
    "passthrough": (1, False, {"scale": [0.5]}),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--methods", nargs="+", default=list(CASES))
    ap.add_argument("--shapes", nargs="+", default=["49152x576", "1536x576"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in (tuple(int(d) for d in s.split("x")) for s in args.shapes):
        base = torch.randn(shape, generator=g) * 0.02
        copies = [base + 0.01 * base.std() * torch.randn(shape, generator=g) for _ in range(3)]
        for name in args.methods:
            n, has_base, params = CASES[name]
            tensors = ([base] + copies)[:n] if has_base else copies[:n]
            calls = {"mergekit": mergekit_call(name, tensors, has_base, params),
                     "fusionlab": fusionlab_call(name, tensors, has_base, params)}
            best = {k: float("inf") for k in calls}
            outs = {}
            for _ in range(args.repeats):
                for tool, fn in calls.items():
                    t = time.perf_counter()
                    outs[tool] = fn()
                    best[tool] = min(best[tool], time.perf_counter() - t)
            equal = torch.equal(outs["mergekit"], outs["fusionlab"])
            row = {"shape": list(shape), "method": name, "bit_equal": equal, "mergekit_s": round(best["mergekit"], 4),
                   "fusionlab_s": round(best["fusionlab"], 4), "speedup": round(best["mergekit"] / best["fusionlab"], 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(), "threads": 1, "repeats": args.repeats, "torch": torch.__version__}
    print(json.dumps(meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
