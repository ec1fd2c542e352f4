"""Fusion step overhead over plain CLM, measured in one process with interleaved steps (issue 12 target ≤ 15%).

The same FuseLightningModule step (forward, loss, backward, AdamW step) on the embedded SmolLM2-135M
(fp32) with λ = 0.9 (CLM + fusion loss over M = 2 candidate top-k = 10 targets, as a FuseChat pairwise
batch) and with λ = 1 (the CLM baseline twin: the fusion term is not computed), alternating in ABBA order
so drifting machine load hits both equally. Reported: the mean over step pairs of log(t_fused / t_clm)
with a 95% paired-bootstrap interval (fusionlab.metrics.stats), as an overhead percentage.

    python experiments/distill/bench_overhead.py --pairs 12 --batch 4 --length 128
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from fusionlab.distill.data import collate
from fusionlab.distill.module import FuseLightningModule
from fusionlab.metrics.stats import paired_bootstrap
from fusionlab.models import ModelSpec, load_model


def batch_of(B: int, L: int, V: int, M: int = 2, k: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    assistant = np.zeros(L, bool)
    assistant[L // 4:] = True  # a prompt, then the reply
    return collate([{"input_ids": rng.integers(0, V, L), "assistant": assistant,
                     "target_ids": rng.integers(0, V, (M, L, k)), "target_logits": rng.normal(size=(M, L, k)).astype(np.float32),
                     "ce": rng.random(M).astype(np.float32)} for _ in range(B)])


def step(module: FuseLightningModule, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    t = time.perf_counter()
    loss = module._step(batch)["loss"]
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelSpec(name="smollm2_135m", source="embedded", path="smollm2_135m"))
    module = FuseLightningModule(model.train(), lam=0.9)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-7)  # tiny lr: the weights (and step costs) stay put
    batch = batch_of(args.batch, args.length, len(tok))
    for lam in (0.9, 1.0):  # warm-up of both paths
        module.lam = lam
        step(module, opt, batch)
    fused, clm = [], []
    for i in range(args.pairs):
        order = (0.9, 1.0) if i % 2 == 0 else (1.0, 0.9)  # ABBA
        for lam in order:
            module.lam = lam
            (fused if lam == 0.9 else clm).append(step(module, opt, batch))
    log_ratio = [math.log(f / c) for f, c in zip(fused, clm)]
    d = paired_bootstrap(log_ratio, [0.0] * len(log_ratio))
    tokens = args.batch * args.length
    out = {"pairs": args.pairs, "batch": args.batch, "length": args.length, "threads": args.threads,
           "fused_s_per_step_median": float(np.median(fused)), "clm_s_per_step_median": float(np.median(clm)),
           "fused_tokens_per_s": tokens / float(np.median(fused)), "clm_tokens_per_s": tokens / float(np.median(clm)),
           "overhead_pct": 100 * (math.exp(d.diff) - 1), "overhead_pct_low": 100 * (math.exp(d.low) - 1),
           "overhead_pct_high": 100 * (math.exp(d.high) - 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
