"""Benchmark: the whole representation-metrics suite vs Diff-eRank alone vs the Diff-eRank reference loop,
and the matrix nuclear norm vs matrix entropy on one large token matrix.

1. Embedded SmolLM2-135M on N texts (shipped GSM8K question + answer, truncated to --max-length tokens):
   - forward only: the batched no-grad passes (hidden states of every layer), no metric;
   - suite: every metric at every layer from one pass + the untrained twin's pass (Diff-eRank);
   - Diff-eRank alone, last layer (what the reference computes), trained + twin;
   - reference loop: the seed repository's formulation (one text per forward, last hidden state,
     d x d covariance, ``torch.svd`` in float32) for the trained model and its untrained twin.
   Model loading is outside every timing; the twin is built inside the timings that need it.
2. One N x d matrix (default 2048 x 4096): matrix entropy (Gram spectrum, fp64 eigvalsh), the nuclear
   norm's column-norm approximation (no SVD), and the exact nuclear norm (same spectrum as the entropy).

    python experiments/metrics/bench_suite.py --threads 1                  # CPU
    python experiments/metrics/bench_suite.py --device cuda --texts 256 --max-length 256

Prints markdown tables (and writes them as JSON with --json PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from bench_erank import hidden_like, reference_entropy
from fusionlab.metrics.representation import Tokens, nuclear_norm, prompt_entropy
from fusionlab.metrics.suite import MetricConfig, hidden_states, measure, measure_twin, summarize, untrained_twin

GSM8K = Path(__file__).resolve().parents[2] / "fusionlab" / "data" / "tasks" / "gsm8k" / "test.jsonl"


def gsm8k_texts(n: int) -> list[str]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[:n]]
    return [f"{r['question']}\n{r['answer']}" for r in rows]


def clock(fn, device: str):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


@torch.no_grad()
def forward_only(model, ids: list[list[int]], batch_size: int, pad_id: int) -> None:
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    for start in range(0, len(ids), batch_size):
        idx = order[start:start + batch_size]
        t = max(len(ids[i]) for i in idx)
        x = torch.full((len(idx), t), pad_id, dtype=torch.long)
        m = torch.zeros(len(idx), t, dtype=torch.bool)
        for row, i in enumerate(idx):
            x[row, :len(ids[i])], m[row, :len(ids[i])] = torch.tensor(ids[i]), True
        hidden_states(model, x.to(device), m.to(device))


@torch.no_grad()
def reference_loop(model, ids: list[list[int]]) -> list[float]:
    """The seed's loop: one text per forward pass, last hidden state, fp32 SVD entropy."""
    device = next(model.parameters()).device
    return [reference_entropy(hidden_states(model, torch.tensor([x], device=device),
                                            torch.ones(1, len(x), dtype=torch.bool, device=device))[-1][0].float())
            for x in ids]


def bench_models(args) -> dict:
    from fusionlab.models import ModelSpec, load_model
    from fusionlab.metrics.suite import tokenize

    model, tok = load_model(ModelSpec(name="smollm2_135m", source="embedded", path="smollm2_135m", device=args.device))
    ids, _ = tokenize(tok, gsm8k_texts(args.texts), args.max_length)
    pad = tok.pad_token_id or 0
    n_tokens = sum(map(len, ids))
    params = next(model.parameters())
    suite = MetricConfig(metrics=["suite"], layers="all", batch_size=args.batch_size)
    alone = MetricConfig(metrics=["diff_erank"], layers="last", batch_size=args.batch_size)

    def run_suite():
        trained = measure(model, ids, suite, pad)
        return summarize(trained, measure_twin(model.config, ids, suite, pad, params.dtype, params.device), suite)

    def run_alone():
        trained = measure(model, ids, alone, pad)
        return summarize(trained, measure_twin(model.config, ids, alone, pad, params.dtype, params.device), alone)

    def run_reference():
        trained = reference_loop(model, ids)
        twin = untrained_twin(model.config, 0, params.dtype, params.device)
        untrained = reference_loop(twin, ids)
        geo = lambda hs: math.exp(sum(hs) / len(hs))  # noqa: E731  (the reference's dataset average)
        return geo(untrained) - geo(trained)

    t_forward, _ = clock(lambda: forward_only(model, ids, args.batch_size, pad), args.device)
    t_build, _ = clock(lambda: untrained_twin(model.config, 0, params.dtype, params.device), args.device)
    t_suite, rows = clock(run_suite, args.device)
    t_alone, alone_rows = clock(run_alone, args.device)
    t_ref, ref_diff = clock(run_reference, args.device)
    return {"texts": len(ids), "tokens": n_tokens, "layers": len(rows), "t_forward_s": t_forward,
            "t_twin_build_s": t_build,
            "t_suite_s": t_suite, "t_diff_erank_s": t_alone, "t_reference_s": t_ref,
            "diff_erank": alone_rows[-1]["diff_erank"], "diff_erank_suite_last": rows[-1]["diff_erank"],
            "diff_erank_reference": ref_diff}


def bench_matrix(n: int, d: int, device: str, reps: int) -> dict:
    rep = hidden_like(n, d, device, seed=1)
    fns = {"matrix_entropy": lambda: prompt_entropy(Tokens(rep), 1.0),
           "nuclear_norm_approx": lambda: nuclear_norm(Tokens(rep)),
           "nuclear_norm_exact": lambda: nuclear_norm(Tokens(rep), exact=True)}
    out = {"N": n, "d": d}
    for name, fn in fns.items():
        fn()  # warm-up
        out[f"t_{name}_s"] = min(clock(fn, device)[0] for _ in range(reps))
        out[name] = float(fn()[0])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--texts", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--matrix", default="2048x4096", help="N x d of part 2")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-models", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {args.device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    result = {}
    if not args.skip_models:
        m = result["models"] = bench_models(args)
        print(f"\nSmolLM2-135M, {m['texts']} texts, {m['tokens']} tokens, {m['layers']} hidden states\n")
        passes = 2 * m["t_forward_s"] + m["t_twin_build_s"]  # trained + twin forward, twin initialisation
        print(f"forward pass (hidden states of every layer, no metric): {m['t_forward_s']:.2f} s; "
              f"building the untrained twin: {m['t_twin_build_s']:.2f} s\n")
        print("| run (trained model + untrained twin) | time (s) | metric math = time − 2 passes − twin build (s) "
              "| Diff-eRank (last layer, geo) |")
        print("|---|---:|---:|---:|")
        for name, key, value in (("suite: 7 metrics × every layer", "t_suite_s", m["diff_erank_suite_last"]),
                                 ("Diff-eRank alone, last layer", "t_diff_erank_s", m["diff_erank"]),
                                 ("reference loop (batch 1, fp32 d×d SVD)", "t_reference_s",
                                  m["diff_erank_reference"])):
            print(f"| {name} | {m[key]:.2f} | {m[key] - passes:.2f} | {value:.6f} |")
        print(f"\nreference / suite: {m['t_reference_s'] / m['t_suite_s']:.2f}×; "
              f"reference / Diff-eRank alone: {m['t_reference_s'] / m['t_diff_erank_s']:.2f}×")
    n, d = map(int, args.matrix.lower().split("x"))
    x = result["matrix"] = bench_matrix(n, d, args.device, args.reps)
    print(f"\nOne {n} x {d} matrix (min of {args.reps}):\n")
    print("| function | time (s) | value |")
    print("|---|---:|---:|")
    for name in ("matrix_entropy", "nuclear_norm_approx", "nuclear_norm_exact"):
        print(f"| {name} | {x[f't_{name}_s']:.4f} | {x[name]:.6g} |")
    print(f"\nmatrix entropy / nuclear norm (approx): {x['t_matrix_entropy_s'] / x['t_nuclear_norm_approx_s']:.1f}×")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
