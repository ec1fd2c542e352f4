"""Does the source know the pivot's data better than the pivot does? (issue 12: why fusion adds nothing here)

FuseLLM/FuseChat distil the *sources'* next-token distributions into the pivot; that can only beat plain
causal-LM training when the sources predict the training text better than the pivot. Cross-entropy per
token is not comparable across tokenizers, so this scores each model in **nats per byte** of the assistant
replies, each with its own tokenizer, on exactly the characters the distillation run uses (the
fusechat_pairwise defaults: the pivot's chat template, the text cut at 128 pivot tokens;
``fusionlab.distill.representations.prepare_texts``), on the held-out conversations (never trained on).

A token counts when it starts inside an assistant span (and is not the text's first token); its bytes are
the UTF-8 bytes of the characters it covers. Per conversation: Σ NLL / Σ bytes; intervals: 95% bootstrap
over conversations, differences paired.

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/distill/source_advantage.py [--split heldout|dev|train]
        [--source DIR]   # another source checkpoint (default: the embedded Gemma-3-270M)
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fusionlab.distill.config import DataConfig
from fusionlab.distill.conversations import load_conversations, split_conversations
from fusionlab.distill.representations import prepare_texts, tokenize_with_spans
from fusionlab.metrics.stats import paired_bootstrap
from fusionlab.models import ModelSpec, load_model

PIVOT = ModelSpec(name="smollm2_135m", source="embedded", path="smollm2_135m")
SOURCE = ModelSpec(name="gemma3_270m", source="embedded", path="gemma3_270m", use_chat_template=False)


def nats_per_byte(model, tokenizer, texts: list[dict], add_bos: bool) -> tuple[list[float], list[float]]:
    """Per conversation (Σ NLL, Σ bytes) over the tokens that start inside an assistant span."""
    nll_sums, byte_sums = [], []
    for t in texts:
        enc = tokenize_with_spans(tokenizer, t["text"], t["spans"], add_bos=add_bos)
        ids = torch.as_tensor(enc["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        total_nll = total_bytes = 0.0
        for pos, (a, b) in enumerate(enc["offsets"][1:].tolist(), start=1):
            if b > a and any(lo <= a < hi for lo, hi in t["spans"]):
                total_nll += float(nll[pos - 1])
                total_bytes += len(t["text"][a:b].encode())
        nll_sums.append(total_nll)
        byte_sums.append(total_bytes)
    return nll_sums, byte_sums


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--split", choices=["heldout", "dev", "train"], default="heldout")
    ap.add_argument("--max-length", type=int, default=128)  # fusechat_pairwise's distill.data.max_length
    ap.add_argument("--dev-size", type=int, default=64)  # fusechat_pairwise's distill.data.dev_size
    ap.add_argument("--limit", type=int, default=64, help="conversations scored (train: the first N)")
    ap.add_argument("--source", help="a source checkpoint dir (default: the embedded Gemma-3-270M, plain text)")
    args = ap.parse_args()
    source = SOURCE if args.source is None else ModelSpec(name=Path(args.source).name, source="hf", path=args.source)
    torch.set_num_threads(1)
    dc = DataConfig(dev_size=args.dev_size, max_length=args.max_length)
    train, heldout, dev = split_conversations(load_conversations(dc.path), dc.heldout, dc.heldout_seed, dc.dev_size)
    conversations = {"heldout": heldout, "dev": dev, "train": train}[args.split][:args.limit]
    t0 = time.time()
    pivot_model, pivot_tok = load_model(PIVOT)
    texts = prepare_texts(pivot_tok, conversations, args.max_length)
    scores = {PIVOT.name: nats_per_byte(pivot_model, pivot_tok, texts, add_bos=False)}
    del pivot_model
    source_model, source_tok = load_model(source)
    adds_bos = source_tok.bos_token_id is not None and source_tok("a")["input_ids"][:1] == [source_tok.bos_token_id]
    scores[source.name] = nats_per_byte(source_model, source_tok, texts, add_bos=adds_bos)
    per_conv = {k: [n / b for n, b in zip(*v)] for k, v in scores.items()}
    out = {"split": args.split, "conversations": len(texts), "max_length": args.max_length,
           "assistant_bytes": sum(scores[PIVOT.name][1])}
    print(f"{args.split}: {len(texts)} conversations, {out['assistant_bytes']:.0f} assistant bytes "
          f"({time.time() - t0:.0f} s)\n\n| model | nats / byte (mean over conversations, 95% CI) | pooled |\n|---|---|---|")
    for name, values in per_conv.items():
        d = paired_bootstrap(values, [0.0] * len(values), resamples=10000, seed=0)
        pooled = sum(scores[name][0]) / sum(scores[name][1])
        out[name] = {"mean": d.diff, "low": d.low, "high": d.high, "pooled": pooled}
        print(f"| {name} | {d.diff:.4f} [{d.low:.4f}, {d.high:.4f}] | {pooled:.4f} |")
    d = paired_bootstrap(per_conv[source.name], per_conv[PIVOT.name], resamples=10000, seed=0)
    wins = float(np.mean([s < p for s, p in zip(per_conv[source.name], per_conv[PIVOT.name])]))
    out["source_minus_pivot"] = {"diff": d.diff, "low": d.low, "high": d.high, "source_better_share": wins}
    print(f"| source − pivot (paired) | {d.diff:+.4f} [{d.low:+.4f}, {d.high:+.4f}] | source better on {wins:.0%} |")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
