"""Training throughput on CPU: the FuseChat loss with sparse targets vs reference-style dense targets.

Model: the embedded SmolLM2-135M (the pivot of +experiment=fusechat_pairwise), fp32, AdamW.
Batch: B sequences of L tokens with M=2 candidate top-k (k=10) target distributions, all tokens
assistant tokens. "reference-style" fills a dense [B, L, V] target in Python loops per batch
(as FuseChat's collator does) and takes the dense CE; fusionlab gathers log-probs at the ≤M·k
target ids on device. Also the Lightning fit (FuseLightningModule + Trainer) tokens/s.

    python experiments/distill/bench_train.py --batch 2 --length 256 --steps 3

``--memory TOKENS``: resident memory of the fused training set, loaded whole (every record in RAM, as
before) vs the lazy memory-mapped ``FusedSet`` read through one epoch of the DataLoader, each in a fresh
process (M=2 candidates, k=10, the layout ``save_fused`` writes):

    python experiments/distill/bench_train.py --memory 2000000
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import numpy as np
import torch

from fusionlab.distill.loss import fusion_loss


def synthetic_records(n, L, V, M=2, k=10, seed=0):
    rng = np.random.default_rng(seed)
    return [{"id": str(i), "input_ids": rng.integers(0, V, L), "assistant": np.ones(L, bool),
             "target_ids": rng.integers(0, V, (M, L, k)), "target_logits": rng.normal(size=(M, L, k)).astype(np.float32),
             "ce": rng.random(M).astype(np.float32)} for i in range(n)]


def dense_reference_loss(logits, batch, lam=0.9):
    """FuseChat-style: dense target built in Python loops, then CE against softmax(logits)."""
    B, M, L, k = batch["target_ids"].shape
    V = logits.shape[-1]
    target = torch.zeros(B, L, V)
    best = batch["ce"].argmin(-1)
    for b in range(B):
        m = int(best[b])
        for t in range(L):
            ids = batch["target_ids"][b, m, t].tolist()
            p = torch.softmax(batch["target_logits"][b, m, t], -1).tolist()
            for i, pi in zip(ids, p):
                target[b, t, i] = pi
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    labels = batch["labels"][:, 1:]
    mask = (labels != -100).float()
    clm = (-logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * mask).sum() / mask.sum()
    fus = ((-(target[:, :-1] * logp).sum(-1)) * mask).sum() / mask.sum()
    return lam * clm + (1 - lam) * fus


def time_manual(model, batch, loss_kind, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for s in range(steps + 1):
        t = time.perf_counter()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if loss_kind == "sparse":
            loss = fusion_loss(logits, batch["labels"], batch["target_ids"], batch["target_logits"], batch["ce"])["loss"]
        else:
            loss = dense_reference_loss(logits, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if s:  # first step is warm-up
            times.append(time.perf_counter() - t)
    return float(np.mean(times))


def _rss_mb(kind: str = "RssAnon") -> float:
    """Private (anonymous) resident memory: what each rank pays alone. Pages of a memory-mapped file count as
    RssFile instead: shared by every rank on the node through the page cache, and dropped under pressure."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(kind + ":")) / 1024


def memory_child(path: str, mode: str) -> None:
    """In a fresh process: RSS before, after loading the fused set, and after reading every record."""
    from fusionlab.distill.data import FuseDataModule
    from fusionlab.distill.dist_align import load_fused

    before = _rss_mb()
    records = load_fused(path, lazy=mode == "lazy")
    loaded = _rss_mb()
    dm = FuseDataModule(records, batch_size=4, shuffle=False)
    n = sum(int(b["attention_mask"].sum()) for b in dm.train_dataloader())
    print(json.dumps({"mode": mode, "tokens": n, "rss_before_mb": round(before, 1),
                      "rss_loaded_mb": round(loaded, 1), "rss_after_epoch_mb": round(_rss_mb(), 1),
                      "rss_file_after_epoch_mb": round(_rss_mb("RssFile"), 1)}))


def memory(tokens: int, length: int = 512) -> None:
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from fusionlab.distill.dist_align import save_fused

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "fused.safetensors")
        save_fused(synthetic_records(tokens // length, length, 49152), path)
        size = Path(path).stat().st_size
        print(json.dumps({"tokens": tokens, "file_mb": round(size / 2**20, 1), "file_bytes_per_token": size / tokens}))
        for mode in ("eager", "lazy"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", path, mode], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            r["loaded_bytes_per_token"] = round((r["rss_loaded_mb"] - r["rss_before_mb"]) * 2**20 / tokens, 1)
            r["epoch_bytes_per_token"] = round((r["rss_after_epoch_mb"] - r["rss_before_mb"]) * 2**20 / tokens, 1)
            print(json.dumps(r))


def main():
    import sys

    if len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
        return memory_child(sys.argv[2], sys.argv[3])
    if len(sys.argv) > 2 and sys.argv[1] == "--memory":
        return memory(int(sys.argv[2]))
    import lightning as L

    from fusionlab.distill.data import FuseDataModule, collate
    from fusionlab.distill.module import FuseLightningModule
    from fusionlab.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_model({"name": "smollm2_135m", "source": "embedded", "path": "smollm2_135m"})
    model.train()
    V = model.config.vocab_size
    recs = synthetic_records(args.batch * (args.steps + 1), args.length, V)
    batch = collate(recs[: args.batch])
    ntok = args.batch * args.length
    res = {"threads": torch.get_num_threads(), "batch": args.batch, "length": args.length, "vocab": V}
    for kind in ("sparse", "dense_reference"):
        s = time_manual(model, batch, kind, args.steps)
        res[f"{kind}_step_s"] = round(s, 3)
        res[f"{kind}_tokens_per_s"] = round(ntok / s, 1)
    module = FuseLightningModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-6))
    trainer = L.Trainer(accelerator="cpu", max_steps=args.steps + 1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False)
    trainer.fit(module, datamodule=FuseDataModule(recs, batch_size=args.batch))
    res["lightning_fit_tokens_per_s"] = round(module.tokens_seen / module.step_seconds, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
