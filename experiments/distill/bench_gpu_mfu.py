"""GPU throughput and MFU of FuseLightningModule on a 1B-shaped Llama (random weights), per strategy.

NOT MEASURED YET: the session that wrote this had no GPU. Run on one H100/H200:

    python experiments/distill/bench_gpu_mfu.py --strategies fsdp deepspeed_z2 --batch 8 --length 2048

Model: Llama-3.2-1B shape (hidden 2048, 16 layers, FFN 8192, 32 heads / 8 KV heads) with the
SmolLM2 vocabulary size (49152); bf16-mixed; synthetic fused batches (M=2, k=10), every token an
assistant token. MFU = achieved model FLOP/s ÷ peak dense bf16 FLOP/s, with model FLOPs per token
= 6·N (parameters, embeddings included) + 12·layers·hidden·seq (attention), the PaLM convention.
Target (issue 6): MFU ≥ 35% on one H100. The strategies come from conf/trainer/*.yaml.
"""
from __future__ import annotations

import argparse
import functools
import json
import time

import torch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Timer:
    def __init__(self):
        import lightning as L

        class _T(L.Callback):
            def __init__(s):
                s.times, s.t = [], 0.0

            def on_train_batch_start(s, trainer, pl_module, batch, batch_idx):
                torch.cuda.synchronize()
                s.t = time.perf_counter()

            def on_train_batch_end(s, trainer, pl_module, outputs, batch, batch_idx):
                torch.cuda.synchronize()
                s.times.append(time.perf_counter() - s.t)

        self.cb = _T()


def strategy(name: str):
    import lightning.pytorch.strategies as S

    if name == "fsdp":
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        return S.FSDPStrategy(sharding_strategy="FULL_SHARD", auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}),
                              limit_all_gathers=True)
    if name == "deepspeed_z2":
        return S.DeepSpeedStrategy(stage=2)
    if name == "ddp":
        return S.DDPStrategy()
    return "auto"


def run(name: str, args) -> dict:
    import lightning as L
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusionlab.distill.data import FuseDataModule
    from fusionlab.distill.module import FuseLightningModule
    from bench_train import synthetic_records  # sibling script (run from the repo root)

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=49152, max_position_embeddings=args.length,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    module = FuseLightningModule(model, optimizer=functools.partial(torch.optim.AdamW, lr=1e-5, fused=True),
                                 gradient_checkpointing=args.grad_ckpt)
    steps = args.warmup + args.steps
    recs = synthetic_records(args.batch * steps, args.length, cfg.vocab_size)
    timer = Timer()
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy(name), precision="bf16-mixed",
                        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=[timer.cb])
    trainer.fit(module, datamodule=FuseDataModule(recs, batch_size=args.batch))
    step_s = sum(timer.cb.times[args.warmup:]) / args.steps
    tokens = args.batch * args.length
    flops_per_token = 6 * n_params + 12 * cfg.num_hidden_layers * cfg.hidden_size * args.length
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), PEAK_BF16["H100"])
    return {"strategy": name, "gpu": gpu, "params": n_params, "batch": args.batch, "length": args.length,
            "step_s": round(step_s, 4), "tokens_per_s": round(tokens / step_s, 1),
            "mfu": round(tokens / step_s * flops_per_token / peak, 4),
            "max_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategies", nargs="+", default=["fsdp", "deepspeed_z2"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--grad-ckpt", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu_mfu.py needs a CUDA GPU")
    for name in args.strategies:
        try:
            print(json.dumps(run(name, args)), flush=True)
        except ImportError as e:  # e.g. deepspeed not installed on the GPU box
            print(json.dumps({"strategy": name, "skipped": str(e)}), flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
