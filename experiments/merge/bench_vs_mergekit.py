"""fusionlab's merge engine vs mergekit 0.1.5 on the same merges: equality, wall time, peak RSS.

Each merge runs in its own fresh worker process (so peak RSS = that merge's ru_maxrss, and
neither tool warms the other's page cache more than the other: inputs are read once before
timing starts). Equality: max over tensors of max|a - b| / max|b| (fp32).

    python experiments/merge/bench_vs_mergekit.py                  # tiny + SmolLM2-sized, all methods
    python experiments/merge/bench_vs_mergekit.py --sets smollm2 --methods ties --repeats 2
    python experiments/merge/bench_vs_mergekit.py --device cuda    # on a GPU box (both tools on the GPU)
    python experiments/merge/bench_vs_mergekit.py --sets smollm2 --methods ties ties_index  # + fusionlab tie_break=index

Model sets (built once, cached under $FUSIONLAB_CACHE/merge_bench):
- tiny: a random 4-layer Llama (hidden 256, vocab 4096) + 3 copies with Gaussian perturbations;
- smollm2: the embedded SmolLM2-135M-Instruct + 3 perturbations (N(0, (0.01·std)²) per tensor,
  ``fusionlab.merge.derive.perturb``: same shapes and value statistics as fine-tunes);
- llama1b: a random 1B-shaped Llama (hidden 2048, 16 layers) + 3 perturbations (opt-in: 4 × 4.4 GB fp32).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SETS = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=False),
    "llama1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
}


def build_set(name: str, root: Path) -> dict[str, str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusionlab.merge.derive import perturb
    from fusionlab.models import embedded_checkpoint

    d = root / name
    if name == "smollm2":
        base = embedded_checkpoint("smollm2_135m")
    else:
        base = d / "base"
        if not (base / "config.json").exists():
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**SETS[name])).save_pretrained(base)
    out = {"base": str(base)}
    for k in range(3):
        out[f"m{k}"] = str(perturb(base, d / f"m{k}", scale=0.01, seed=k + 1))
    return out


def merge_config(method: str, s: dict[str, str], tool: str = "mergekit") -> dict:
    """``<method>_index`` = <method> with fusionlab's ``tie_break: index`` (mergekit runs plain <method>)."""
    if method.endswith("_index"):
        cfg = merge_config(method.removesuffix("_index"), s)
        if tool == "fusionlab":
            cfg["parameters"] = {**cfg.get("parameters", {}), "tie_break": "index"}
        return cfg
    m = [s["m0"], s["m1"], s["m2"]]
    n = json.loads((Path(s["base"]) / "config.json").read_text())["num_hidden_layers"]
    dens = [(1.0, 0.5), (0.5, 0.5), (0.5, 0.3)]
    body = {
        "linear": {"models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, [1, 1, 0.5])]},
        "task_arithmetic": {"base_model": s["base"], "parameters": {"lambda": 0.8},
                            "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, [1, 0.5, 0.5])]},
        "ties": {"base_model": s["base"], "models": [{"model": p, "parameters": {"weight": w, "density": d}}
                                                      for p, (w, d) in zip(m, dens)]},
        "breadcrumbs": {"base_model": s["base"], "models": [{"model": p, "parameters": {"weight": w, "density": d, "gamma": 0.01}}
                                                             for p, (w, d) in zip(m, dens)]},
        "sce": {"base_model": s["base"], "parameters": {"select_topk": 0.5}, "models": [{"model": p} for p in m]},
        # mergekit's newer methods (issue 14)
        "nuslerp": {"base_model": s["base"], "models": [{"model": p, "parameters": {"weight": w}}
                                                         for p, w in zip(m[:2], [1, 0.5])]},
        "multislerp": {"base_model": s["base"], "models": [{"model": p, "parameters": {"weight": w}}
                                                            for p, w in zip(m, [1, 0.5, 0.5])]},
        "karcher": {"models": [{"model": p} for p in m]},
        "nearswap": {"base_model": s["base"], "parameters": {"t": 0.001}, "models": [{"model": m[0]}]},
        "arcee_fusion": {"base_model": s["base"], "models": [{"model": m[0]}]},
        "passthrough": {"slices": [{"sources": [{"model": m[0], "layer_range": [0, 2 * n // 3]}]},  # frankenmerge
                                   {"sources": [{"model": m[1], "layer_range": [n // 3, n]}]}]},
    }[method]
    return {"merge_method": method, "dtype": "float32", **body}


def worker(tool: str, config_path: str, out: str, device: str, threads: int) -> None:
    """One merge in this process; prints {"seconds", "peak_rss_mb"} as the last line."""
    import torch

    torch.set_num_threads(threads)
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(config_path).read_text()))
        opts = MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False, device=device,
                            num_threads=threads)
        start = time.perf_counter()
        run_merge(cfg, out, options=opts)
    else:
        from fusionlab.merge import merge
        from fusionlab.merge.mergekit_yaml import load_mergekit_config

        cfg = load_mergekit_config(config_path, out, progress=False, device=device)
        start = time.perf_counter()
        merge(cfg)
    seconds = time.perf_counter() - start
    # VmHWM: this process image's peak RSS (ru_maxrss would also count the parent's RSS at fork time)
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1)}))


def max_rel_diff(a_dir: Path, b_dir: Path) -> float:
    from fusionlab.merge.io import CheckpointReader

    a, b = CheckpointReader(a_dir), CheckpointReader(b_dir)
    worst = 0.0
    for name in b.names:
        x, y = a.get(name), b.get(name)
        worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)))
    missing = set(b.names) ^ set(a.names)
    if missing:
        raise SystemExit(f"tensor sets differ: {sorted(missing)[:5]}")
    return worst


def run_one(tool: str, cfg_path: Path, out: Path, device: str, threads: int) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # neither tool pays for the other's (or the last run's) dirty pages being written back
    t = time.perf_counter()
    res = subprocess.run([sys.executable, __file__, "--worker", tool, str(cfg_path), str(out), "--device", device,
                          "--threads", str(threads)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{res.stderr[-3000:]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["process_seconds"] = round(time.perf_counter() - t, 2)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "CONFIG", "OUT"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both tools (1: on a shared, oversubscribed CPU 2 threads run 10-30x slower)")
    ap.add_argument("--sets", nargs="+", default=["tiny", "smollm2"])
    ap.add_argument("--methods", nargs="+", default=["linear", "task_arithmetic", "ties", "breadcrumbs", "sce"])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default=None, help="scratch dir for outputs (default $FUSIONLAB_CACHE/merge_bench/out)")
    ap.add_argument("--json", default=None, help="write all results here")
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker, device=args.device, threads=args.threads)
        return
    from fusionlab.models.embedded import cache_dir

    root = cache_dir() / "merge_bench"
    work = Path(args.work) if args.work else root / "out"
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for set_name in args.sets:
        s = build_set(set_name, root)
        for method in args.methods:
            cfg_paths = {}
            for tool in ("mergekit", "fusionlab"):
                cfg_paths[tool] = work / f"{set_name}_{method}_{tool}.yml"
                cfg_paths[tool].write_text(yaml.safe_dump(merge_config(method, s, tool)))
            for rep in range(args.repeats):
                order = ["mergekit", "fusionlab"] if rep % 2 == 0 else ["fusionlab", "mergekit"]
                res = {tool: run_one(tool, cfg_paths[tool], work / f"{set_name}_{method}_{tool}", args.device, args.threads)
                       for tool in order}
                diff = max_rel_diff(work / f"{set_name}_{method}_fusionlab", work / f"{set_name}_{method}_mergekit")
                row = {"set": set_name, "method": method, "rep": rep, "max_rel_diff": diff,
                       "mergekit_s": res["mergekit"]["seconds"], "fusionlab_s": res["fusionlab"]["seconds"],
                       "speedup": round(res["mergekit"]["seconds"] / res["fusionlab"]["seconds"], 2),
                       "mergekit_rss_mb": res["mergekit"]["peak_rss_mb"], "fusionlab_rss_mb": res["fusionlab"]["peak_rss_mb"],
                       "mergekit_process_s": res["mergekit"]["process_seconds"],
                       "fusionlab_process_s": res["fusionlab"]["process_seconds"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "machine": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_end": os.getloadavg(), "device": args.device, "threads": args.threads, "argv": sys.argv}
    print(json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
