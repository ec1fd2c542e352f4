"""Do Diff-eRank's published trends, and the suite's, show up on the models fusionlab runs on a CPU?

Diff-eRank (Wei et al., NeurIPS 2024) reports that the metric (a) grows with model size within a
family and (b) tracks the loss: it rises as training lowers the loss. Layer by Layer (Skean et al.,
ICML 2025) reports how its metrics move with training, mostly in the intermediate layers. Here:

A. size: the suite on the two embedded models (SmolLM2-135M, Gemma-3-270M; NOT one family) on the
   shipped Diff-eRank texts, with 95% bootstrap intervals over texts (paired for the difference);
B. training: SmolLM2-135M fine-tuned for a few dozen AdamW steps on shipped GSM8K solutions; at each
   checkpoint the held-out loss and the suite on the same held-out GSM8K texts (the untrained twin
   is computed once). Per metric: Spearman's rho with the loss across checkpoints, and the change
   from the first to the last checkpoint with a 95% paired bootstrap interval over texts
   (dataset-level metrics: the share of random half-samples of the texts that give the same sign).

    python experiments/metrics/trends.py --json /tmp/trends.json          # about 10 minutes, 1 thread

Prints markdown tables.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from fusionlab.tasks.texts import load_text_set
from fusionlab.metrics.suite import (Measurements, MetricConfig, evaluate_model, measure, measure_twin, summarize,
                                     tokenize)
from fusionlab.models import ModelSpec, load_model

GSM8K = Path(__file__).resolve().parents[2] / "fusionlab" / "data" / "tasks" / "gsm8k" / "test.jsonl"
PER_TEXT = ("diff_erank", "erank_trained", "prompt_entropy", "curvature", "nuclear_norm")
DATASET = ("dataset_entropy", "lidar", "dime", "infonce")
KEYS = PER_TEXT + DATASET


def spec(name: str) -> ModelSpec:
    return ModelSpec(name=name, source="embedded", path=name)


def gsm8k(start: int, n: int) -> list[str]:
    rows = [json.loads(line) for line in GSM8K.read_text().splitlines()[start:start + n]]
    return [f"Question: {r['question']}\nAnswer: {r['answer']}" for r in rows]


def values(meas, twin, cfg, layer: int, texts, key: str) -> float:
    """``key`` at hidden state ``layer`` on a subset of the texts (dataset-level values recomputed)."""
    if key in PER_TEXT:  # no dataset-level recomputation needed
        meas = Measurements(meas.layers, meas.per_text, {}, None)
    sub_twin = twin.subset(texts, cfg, [layer]) if twin is not None else None
    return summarize(meas.subset(texts, cfg, [layer]), sub_twin, cfg)[0][key]


def per_text_interval(fn, n: int, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of fn(text indices) over texts drawn with replacement."""
    g = torch.Generator().manual_seed(seed)
    draws = sorted(fn(torch.randint(0, n, (n,), generator=g).tolist()) for _ in range(reps))
    return draws[int(0.025 * reps)], draws[int(0.975 * reps) - 1]


def half_sample_sign(fn, n: int, reps: int, seed: int) -> float:
    """Share of random halves of the texts (without replacement) where fn has the sign it has on all texts."""
    g = torch.Generator().manual_seed(seed)
    full = fn(list(range(n)))
    same = sum(math.copysign(1, fn(torch.randperm(n, generator=g)[: n // 2].tolist())) == math.copysign(1, full)
               for _ in range(reps))
    return same / reps


def part_a(args, cfg) -> dict:
    texts = load_text_set(stop=args.size_texts)
    out = {}
    for name in ("smollm2_135m", "gemma3_270m"):
        t = time.perf_counter()
        r = evaluate_model(spec(name), texts, cfg, keep_embeddings=True)
        mid = r.layers[len(r.layers) // 2]
        out[name] = {"result": r, "layers": {"middle": mid, "last": r.layers[-1]}, "s": time.perf_counter() - t}
    n = out["smollm2_135m"]["result"].n_texts
    assert n == out["gemma3_270m"]["result"].n_texts, "both tokenizers must keep the same texts"
    rows = []
    for where in ("middle", "last"):
        for key in KEYS:
            row = {"layer": where, "metric": key}
            for name, o in out.items():
                r, layer = o["result"], o["layers"][where]
                f = lambda idx, r=r, layer=layer: values(r.trained, r.twin, cfg, layer, idx, key)  # noqa: E731
                row[name] = f(list(range(n)))
                if key in PER_TEXT:
                    row[f"{name}_ci"] = per_text_interval(f, n, args.reps, 0)
            if key in PER_TEXT:
                def diff(idx, where=where, key=key):
                    g_, s_ = out["gemma3_270m"], out["smollm2_135m"]
                    return values(g_["result"].trained, g_["result"].twin, cfg, g_["layers"][where], idx, key) - \
                        values(s_["result"].trained, s_["result"].twin, cfg, s_["layers"][where], idx, key)
                row["diff_ci"] = per_text_interval(diff, n, args.reps, 1)
            rows.append(row)
    return {"rows": rows, "n_texts": n, "seconds": {k: o["s"] for k, o in out.items()},
            "layers": {k: o["layers"] for k, o in out.items()}}


@torch.no_grad()
def held_out_loss(model, ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """Per-text mean next-token cross-entropy (nats)."""
    model.eval()
    out = []
    for x in ids:
        t = torch.tensor([x])
        out.append(float(model(input_ids=t, labels=t).loss))
    return torch.tensor(out, dtype=torch.float64)


def part_b(args, cfg) -> dict:
    model, tok = load_model(spec("smollm2_135m"))
    pad = tok.pad_token_id or 0
    held, _ = tokenize(tok, gsm8k(0, args.held_out), args.max_length)
    train, _ = tokenize(tok, gsm8k(500, args.steps * args.batch), args.max_length)
    params = next(model.parameters())
    twin = measure_twin(model.config, held, cfg, pad, params.dtype, params.device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    checkpoints, step, t0 = [], 0, time.perf_counter()
    for target in args.checkpoints:
        model.train()
        while step < target:
            batch = train[step * args.batch:(step + 1) * args.batch]
            width = max(map(len, batch))
            x = torch.full((len(batch), width), pad)
            labels = torch.full((len(batch), width), -100)
            for i, ids in enumerate(batch):
                x[i, :len(ids)], labels[i, :len(ids)] = torch.tensor(ids), torch.tensor(ids)
            loss = model(input_ids=x, attention_mask=(labels != -100).long(), labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        losses = held_out_loss(model, held, pad)
        meas = measure(model, held, cfg, pad, keep_embeddings=True)
        checkpoints.append({"step": step, "loss": losses, "meas": meas})
        print(f"  step {step}: held-out loss {float(losses.mean()):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    layers = {"middle": checkpoints[0]["meas"].layers[len(checkpoints[0]["meas"].layers) // 2],
              "last": checkpoints[0]["meas"].layers[-1]}
    n = len(held)
    first, last = checkpoints[0], checkpoints[-1]
    rows = []
    for where, layer in layers.items():
        for key in KEYS:
            series = [values(c["meas"], twin, cfg, layer, list(range(n)), key) for c in checkpoints]
            row = {"layer": where, "metric": key, "series": series,
                   "rho_loss": spearman(series, [float(c["loss"].mean()) for c in checkpoints])}

            def change(idx, key=key, layer=layer):
                return values(last["meas"], twin, cfg, layer, idx, key) - values(first["meas"], twin, cfg, layer,
                                                                                  idx, key)
            if key in PER_TEXT:
                row["change_ci"] = per_text_interval(change, n, args.reps, 2)
            else:
                row["same_sign_halves"] = half_sample_sign(change, n, args.half_reps, 3)
            rows.append(row)
    loss_ci = per_text_interval(lambda idx: float(last["loss"][idx].mean() - first["loss"][idx].mean()), n,
                                args.reps, 4)
    return {"rows": rows, "steps": [c["step"] for c in checkpoints],
            "loss": [float(c["loss"].mean()) for c in checkpoints], "loss_change_ci": loss_ci, "n_texts": n,
            "layers": layers, "seconds": time.perf_counter() - t0}


def spearman(a: list[float], b: list[float]) -> float:
    rank = lambda v: torch.tensor(v).argsort().argsort().double()  # noqa: E731  (no ties in practice)
    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def fmt_ci(ci) -> str:
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--size-texts", type=int, default=40)
    ap.add_argument("--held-out", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[0, 5, 10, 20, 40])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--reps", type=int, default=1000, help="bootstrap replicates (per-text metrics)")
    ap.add_argument("--half-reps", type=int, default=100, help="random half-samples (dataset-level metrics)")
    ap.add_argument("--skip-size", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    args.steps = max(args.checkpoints)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = MetricConfig(metrics=["suite"], layers="all", max_length=args.max_length, batch_size=8)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    result = {}
    if not args.skip_size:
        a = result["size"] = part_a(args, cfg)
        print(f"\n## A. SmolLM2-135M vs Gemma-3-270M, {a['n_texts']} shipped texts, max_length {args.max_length} "
              f"(hidden states {a['layers']})\n")
        print("| layer | metric | SmolLM2-135M [95% CI] | Gemma-3-270M [95% CI] | Gemma − SmolLM2 [95% paired CI] |")
        print("|---|---|---:|---:|---:|")
        for r in a["rows"]:
            ci = lambda k: f" {fmt_ci(r[k])}" if k in r else ""  # noqa: E731
            print(f"| {r['layer']} | {r['metric']} | {r['smollm2_135m']:.4g}{ci('smollm2_135m_ci')} "
                  f"| {r['gemma3_270m']:.4g}{ci('gemma3_270m_ci')} | {r['gemma3_270m'] - r['smollm2_135m']:+.4g}"
                  f"{ci('diff_ci')} |")
    b = result["training"] = part_b(args, cfg)
    print(f"\n## B. SmolLM2-135M fine-tuned on GSM8K, {b['n_texts']} held-out texts, steps {b['steps']} "
          f"(hidden states {b['layers']})\n")
    print(f"held-out loss: {', '.join(f'{x:.4f}' for x in b['loss'])}; change {b['loss'][-1] - b['loss'][0]:+.4f} "
          f"{fmt_ci(b['loss_change_ci'])}\n")
    print("| layer | metric | value at each checkpoint | Spearman ρ with loss "
          "| last − first [95% CI] or same sign in halves |")
    print("|---|---|---|---:|---:|")
    for r in b["rows"]:
        evidence = fmt_ci(r["change_ci"]) if "change_ci" in r else f"{r['same_sign_halves']:.0%}"
        print(f"| {r['layer']} | {r['metric']} | {', '.join(f'{x:.4g}' for x in r['series'])} | {r['rho_loss']:+.2f} "
              f"| {r['series'][-1] - r['series'][0]:+.3g} {evidence} |")
    if args.json:
        for part in result.values():
            part.pop("result", None)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
