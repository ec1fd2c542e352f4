"""Batched generation (fusionlab.models.generation.generate) vs a plain per-prompt `model.generate` loop.

    python experiments/generation/bench_batched_generation.py --model smollm2_135m --n 16 --max-new-tokens 64

Both runs use the same prompts (AddSub, zero-shot CoT in SmolLM2's chat template), greedy decoding
and the same `max_new_tokens`; stop strings are off so both generate the same number of tokens.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from fusionlab.jobs.evaluate import task_prompts
from fusionlab.models import load_model
from fusionlab.models.generation import generate
from fusionlab.tasks import load_examples


def per_prompt_loop(model, tok, prompts, max_new_tokens):
    """What most papers' scripts do: one prompt at a time."""
    n_tokens, start = 0, time.perf_counter()
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
        n_tokens += out.shape[1] - ids["input_ids"].shape[1]
    return n_tokens / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", default="4,8,16")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model({"name": args.model, "source": "embedded", "path": args.model})
    prompts = task_prompts("addsub", load_examples("addsub", limit=args.n), tok, use_chat_template=True)
    model.generation_config.min_new_tokens = None
    results = {"machine": f"{platform.machine()} {platform.processor()} threads={torch.get_num_threads()}",
               "torch": torch.__version__, "model": args.model, "n_prompts": args.n,
               "max_new_tokens": args.max_new_tokens}
    results["per_prompt_loop_tok_s"] = round(per_prompt_loop(model, tok, prompts, args.max_new_tokens), 2)
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        model.generation_config.min_new_tokens = args.max_new_tokens  # same token count as the loop
        r = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=bs, progress=False)
        results[f"batched_bs{bs}_tok_s"] = round(r.tokens_per_s, 2)
        results[f"speedup_bs{bs}"] = round(r.tokens_per_s / results["per_prompt_loop_tok_s"], 2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
