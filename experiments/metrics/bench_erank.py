"""Benchmark: fusionlab's eRank vs the reference formulation, per text of N tokens x d dims.

reference  (waltonfuture/Diff-eRank): center, unit rows, d x d covariance, ``torch.svd`` in float32,
           entropy with ``nansum``.
fusionlab  (``fusionlab.metrics.representation.matrix_entropy``): the smaller of the N x N Gram and
           d x d covariance, ``eigvalsh`` in float64, round-off eigenvalues clamped.
truth      float64 singular values of the centered unit-row matrix (an independent path).

    python experiments/metrics/bench_erank.py                      # sampled grid, CPU
    python experiments/metrics/bench_erank.py --device cuda --grid full --reps 5
    python experiments/metrics/bench_erank.py --sizes 2048x4096 --device cuda

Prints a markdown table (and writes it as JSON with --json PATH).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time

import torch

from fusionlab.metrics.representation import matrix_entropy

FULL = [(n, d) for n in (128, 256, 512, 1024, 2048) for d in (576, 1024, 2048, 4096)]
SAMPLED = [(128, 576), (512, 576), (2048, 576), (128, 2048), (512, 2048), (2048, 2048), (128, 4096), (2048, 4096)]


def reference_entropy(rep: torch.Tensor) -> float:
    """The published formulation: SVD of the d x d covariance in the input's dtype (float32)."""
    with torch.no_grad():
        z = rep - rep.mean(dim=0)
        z = z / torch.norm(z, p=2, dim=1, keepdim=True)
        z = torch.nn.functional.normalize(z, dim=1)
        cov = z.T @ z / z.shape[0]
        s = torch.svd(cov / torch.trace(cov))[1]
        return -(s * torch.log(s)).nansum().item()


def true_entropy(rep: torch.Tensor) -> float:
    z = rep.double()
    z = z - z.mean(0)
    z = z / z.norm(dim=1, keepdim=True)
    lam = torch.linalg.svdvals(z) ** 2
    p = lam / lam.sum()
    return float(-torch.special.xlogy(p, p).sum())


def hidden_like(n: int, d: int, device: str, seed: int) -> torch.Tensor:
    """Token representations with a decaying spectrum and a large shared mean, like LLM hidden states."""
    g = torch.Generator().manual_seed(seed)
    scale = (1.0 + torch.arange(d, dtype=torch.float32)) ** -0.5
    rep = torch.randn(n, d, generator=g) * scale + 3.0 * torch.randn(1, d, generator=g)
    return rep.to(device)


def timed(fn, rep, reps: int, device: str) -> tuple[float, float]:
    value = fn(rep)  # warm-up (kernels, LAPACK workspaces)
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        value = fn(rep)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return min(times), value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", choices=("sampled", "full"), default="sampled")
    ap.add_argument("--sizes", nargs="*", help="NxD pairs, e.g. 2048x4096 (overrides --grid)")
    ap.add_argument("--reps", type=int, default=1, help="timed repetitions after one warm-up (min is reported)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--max-ref-d", type=int, default=None,
                    help="skip the (cubic in d) reference above this d; its time is then reported as n/a")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [tuple(map(int, s.lower().split("x"))) for s in args.sizes] if args.sizes else (
        FULL if args.grid == "full" else SAMPLED)
    dev = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {args.device} ({dev}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| N | d | reference fp32 d×d SVD (s) | fusionlab fp64 eigvalsh (s) | speed-up | rel. err. fusionlab | rel. err. reference | eRank |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for n, d in sizes:
        rep = hidden_like(n, d, args.device, seed=n * 7 + d)
        truth = true_entropy(rep)
        t_fl, h_fl = timed(matrix_entropy, rep, args.reps, args.device)
        if args.max_ref_d is None or d <= args.max_ref_d:
            t_ref, h_ref = timed(reference_entropy, rep, args.reps, args.device)
        else:
            t_ref, h_ref = float("nan"), float("nan")
        row = {"N": n, "d": d, "t_reference_s": t_ref, "t_fusionlab_s": t_fl, "speedup": t_ref / t_fl,
               "rel_err_fusionlab": abs(h_fl - truth) / truth, "rel_err_reference": abs(h_ref - truth) / truth,
               "erank": math.exp(truth), "device": args.device, "threads": torch.get_num_threads()}
        rows.append(row)
        ref = "n/a" if math.isnan(t_ref) else f"{t_ref:.4f}"
        print(f"| {n} | {d} | {ref} | {t_fl:.4f} | {row['speedup']:.1f}× | {row['rel_err_fusionlab']:.1e} "
              f"| {row['rel_err_reference']:.1e} | {row['erank']:.1f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
