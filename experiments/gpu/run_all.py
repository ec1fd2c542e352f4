"""The prepared GPU check (issue 17): what a CPU cannot verify, in one command and <= 8 minutes.

    bash experiments/gpu/run_all.sh                              # on the GPU box: wheels, then this script
    python experiments/gpu/run_all.py --device cpu --out DIR     # tiny sizes on a CPU (tests/gpu_check)

Parts, in this order, each under its own time budget (``BUDGET_SHARES``; a part that overruns is
stopped and recorded as ``timeout``, and everything a part leaves out is listed under ``skipped``):

1. ``distill``: FuseChat fits of a Llama-3.2-1B-shaped pivot (128k byte-level vocab) with a 0.17B
   source (32k SentencePiece vocab) on ``trainer=gpu`` (bf16), ``fsdp``, ``deepspeed_z2``
   (``trainer.devices=1``), 20 steps + a resume for 2, through ``python -m fusionlab.run``;
2. ``eva``: EVA decoding of 2x1B (and 2x7B/8B when memory and time allow) models with different
   vocabularies, batch 1 and 16, 128 new tokens, vs each member, vs HF ``generate`` with a dynamic
   cache, a static cache and a static cache + ``torch.compile``, vs the HBM bound;
3. ``merge``: TIES and SCE of three 1B-shaped checkpoints on ``merge.device=cuda`` and ``cpu``, same results;
4. ``erank``: Diff-eRank at N=2048, d=4096 vs the reference SVD formulation (+ the metric suite);
5. ``distill_offload``: ``deepspeed_z3_offload``, with whatever time is left.

Models are random, built from transformers configs; tokenizers of the real sizes are built
offline (synthetic_tokenizer.py). Results: ``results.json`` and ``summary.md`` under ``--out``
(default ``$OUT``), rewritten after every part; big files go to ``--scratch`` and are deleted.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parents[1]))

import torch  # noqa: E402

import checks  # noqa: E402
from synthetic_tokenizer import build_tokenizer  # noqa: E402

PARTS = ("distill", "eva", "merge", "erank", "distill_offload")
# share of --budget-s per part (at 480 s: 202, 144, 82, 24 s); the last part gets whatever is left
BUDGET_SHARES = {"distill": 0.42, "eva": 0.30, "merge": 0.17, "erank": 0.05, "distill_offload": 1.0}
TARGETS = {"mfu_gpu_bf16": 0.35, "eva_1b_batch1_frac_hbm_static": 0.5, "merge_gpu_speedup": 5.0,
           "erank_speedup": 50.0}


def machine(args) -> dict[str, Any]:
    def version(mod: str) -> str | None:
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001 — absent or broken: report it as absent
            return None

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 — the GPU box's copy has no .git
        commit = None
    return {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]), "device": args.device,
            "gpu": checks.gpu_name(), "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
            if torch.cuda.is_available() else None, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            **{m: version(m) for m in ("transformers", "lightning", "deepspeed", "hydra")},
            "git_commit": commit, "budget_s": args.budget_s}


def run_parts(args) -> dict[str, Any]:
    p = checks.PROFILES[args.device]
    out, scratch = Path(args.out), Path(args.scratch)
    out.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    results: dict[str, Any] = {"machine": machine(args), "parts": {}, "skipped": []}

    t0 = time.perf_counter()
    tok_dirs = {name: build_tokenizer(scratch / "tokenizers" / f"{style}_{size}", size, style)
                for name, (style, size) in p["tokenizers"].items()}
    results["tokenizers"] = {"vocab_sizes": {n: s for n, (_, s) in p["tokenizers"].items()},
                             "build_s": round(time.perf_counter() - t0, 2)}
    calls = {
        "distill": lambda dl, rec: checks.distill(p, args.device, [s for s in checks.STRATEGIES if s != "deepspeed_z3_offload"]
                                                  if args.device == "cuda" else ["cpu", *checks.STRATEGIES],
                                                  tok_dirs, scratch, out / "logs", dl, rec),
        "eva": lambda dl, rec: checks.eva(p, args.device, tok_dirs, scratch, dl, rec),
        "merge": lambda dl, rec: checks.merge(p, args.device, tok_dirs, scratch, dl, rec),
        "erank": lambda dl, rec: checks.erank(p, args.device, dl, rec),
        "distill_offload": lambda dl, rec: checks.distill(p, args.device, ["deepspeed_z3_offload"], tok_dirs, scratch,
                                                          out / "logs", dl, rec),
    }
    for name in PARTS:
        left = args.budget_s - (time.monotonic() - start)
        if name not in args.parts or (name == "distill_offload" and args.device == "cpu"):
            continue
        if left < 20:
            results["parts"][name] = {"status": "skipped"}
            results["skipped"].append(f"{name}: the {args.budget_s:.0f} s budget was spent")
            continue
        deadline = checks.Deadline(min(BUDGET_SHARES[name] * args.budget_s, left))
        rec: dict[str, Any] = {}
        t0 = time.perf_counter()
        try:
            with checks.armed(deadline):
                calls[name](deadline, rec)
            rec["status"] = "ok"
        except checks.PartTimeout:
            rec["status"] = "timeout"
        except Exception as err:  # noqa: BLE001 — one failing part must not hide the others' figures
            rec["status"] = "failed"
            rec["error"] = f"{type(err).__name__}: {err}"
            rec["traceback"] = traceback.format_exc()[-3000:]
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        results["parts"][name] = rec
        results["skipped"] += [f"{name}: {s}" for s in rec.get("skipped", [])]
        checks.free(args.device)
        results["total_s"] = round(time.monotonic() - start, 2)
        results["targets"] = targets(results, args.device)
        write(results, out)
    results["total_s"] = round(time.monotonic() - start, 2)
    results["targets"] = targets(results, args.device)
    write(results, out)
    return results


def targets(results: dict[str, Any], device: str) -> list[dict[str, Any]]:
    """Issue 17's targets, each with the measured value and met / not met (None: not measured)."""
    parts = results["parts"]
    strategies = {**parts.get("distill", {}).get("strategies", {}), **parts.get("distill_offload", {}).get("strategies", {})}
    rows = [{"target": f"{s}: fit + resume complete, loss finite", "value": r.get("ok"), "met": r.get("ok")}
            for s, r in strategies.items()]
    mfu = strategies.get("gpu", {}).get("fit", {}).get("mfu")
    rows.append({"target": f"MFU >= {TARGETS['mfu_gpu_bf16']:.0%} (1B, trainer=gpu, bf16)", "value": mfu,
                 "met": None if mfu is None else mfu >= TARGETS["mfu_gpu_bf16"]})
    b1 = parts.get("eva", {}).get("pairs", {}).get("1b", {}).get("batches", {}).get("1", {})
    frac = b1.get("ensemble_static_bound_frac_of_hbm_bound")
    rows.append({"target": "EVA 2x1B batch 1 >= 50% of the HBM bound with a static cache",
                 "value": {"ensemble_dynamic_cache": b1.get("ensemble_frac_of_hbm_bound"),
                           "members_static_back_to_back": frac},
                 "met": None, "note": "EvaDecoder has no static cache: not measurable on the ensemble itself"})
    for method, r in parts.get("merge", {}).get("methods", {}).items():
        sp = r.get("gpu_speedup")
        rows.append({"target": f"{method} merge: GPU >= {TARGETS['merge_gpu_speedup']:.0f}x CPU, same results",
                     "value": {"speedup": sp, "same": r.get("same_results", {}).get("same")},
                     "met": None if sp is None else bool(sp >= TARGETS["merge_gpu_speedup"]
                                                         and r.get("same_results", {}).get("same"))})
    er = parts.get("erank", {})
    sp = er.get("speedup_vs_reference_same_device")
    rows.append({"target": f"eRank >= {TARGETS['erank_speedup']:.0f}x the reference SVD (N=2048, d=4096, GPU)",
                 "value": {"vs_reference_same_device": sp, "vs_reference_on_cpu": er.get("speedup_vs_reference_on_cpu")},
                 "met": None if sp is None or device != "cuda" else sp >= TARGETS["erank_speedup"]})
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows], ""]


def summary(results: dict[str, Any]) -> str:
    m, parts = results["machine"], results["parts"]
    lines = [f"# GPU check — {m['date_utc']} UTC", "",
             f"Machine: {m['gpu'] or 'no GPU'} ({m['gpu_memory_gib'] or '–'} GiB), {m['cpu_count']} CPUs; "
             f"python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, "
             f"lightning {m['lightning']}, deepspeed {m['deepspeed']}; commit {m['git_commit'] or '–'}.",
             f"Command: `{m['command']}`; total {results.get('total_s')} s of a {m['budget_s']:.0f} s budget.", "",
             "## Parts", ""]
    lines += _table(["part", "status", "seconds", "error"],
                    [[n, r.get("status"), r.get("seconds"), r.get("error")] for n, r in parts.items()])
    strategies = {**parts.get("distill", {}).get("strategies", {}), **parts.get("distill_offload", {}).get("strategies", {})}
    if strategies:
        n = parts.get("distill", {}).get("pivot_matmul_params") or 0
        lines += [f"## Distillation (FuseChat pairwise, pivot {n / 1e9:.2f}B matmul parameters, fit then resume)", ""]
        lines += _table(["strategy", "ok", "fit steps", "step s", "tokens/s", "MFU", "peak alloc GiB", "loss first → last",
                         "resume steps", "resume loss", "fit / resume process s"],
                        [[s, r.get("ok"), r.get("fit", {}).get("job_steps"), r.get("fit", {}).get("step_s"),
                          r.get("fit", {}).get("tokens_per_s"), r.get("fit", {}).get("mfu"),
                          r.get("fit", {}).get("peak_allocated_gib"),
                          f"{_fmt(r.get('fit', {}).get('loss_first'))} → {_fmt(r.get('fit', {}).get('loss_last'))}",
                          r.get("resume", {}).get("steps"), r.get("resume", {}).get("loss_last"),
                          f"{_fmt(r.get('fit', {}).get('process_s'))} / {_fmt(r.get('resume', {}).get('process_s'))}"]
                         for s, r in strategies.items()])
    pairs = parts.get("eva", {}).get("pairs", {})
    if pairs:
        lines += ["## EVA decoding (tokens/s, all rows of the batch; 'static+compile' = HF generate, static cache, "
                  "torch.compile)", ""]
        rows = []
        for pair, rec in pairs.items():
            for b, r in rec["batches"].items():
                rows.append([pair, b, r.get("main_tok_s"), r.get("aux_tok_s"), r.get("ensemble_tok_s"),
                             r.get("ensemble_speed_vs_members"), r.get("hbm_bound_ensemble_tok_s"),
                             r.get("ensemble_frac_of_hbm_bound"),
                             f"{_fmt(r.get('main_hf_dynamic_tok_s'))} / {_fmt(r.get('main_hf_static_tok_s'))} / "
                             f"{_fmt(r.get('main_hf_static_compiled_tok_s'))}",
                             f"{_fmt(r.get('aux_hf_dynamic_tok_s'))} / {_fmt(r.get('aux_hf_static_tok_s'))} / "
                             f"{_fmt(r.get('aux_hf_static_compiled_tok_s'))}",
                             r.get("ensemble_static_bound_tok_s")])
        lines += _table(["pair", "batch", "main (EVA loop)", "aux (EVA loop)", "ensemble", "ensemble vs members",
                         "HBM bound (ensemble)", "ensemble / bound", "main HF dynamic / static / static+compile",
                         "aux HF dynamic / static / static+compile", "static members back to back"], rows)
    methods = parts.get("merge", {}).get("methods", {})
    if methods:
        lines += [f"## Merging (three fine-tunes + base, {parts['merge'].get('params', 0) / 1e9:.2f}B parameters)", ""]
        lines += _table(["method", "cuda s", "cpu s", "GPU speed-up", "same results", "identical elements"],
                        [[k, r.get("cuda_s"), r.get("cpu_s", r.get("cpu_repeat_s")), r.get("gpu_speedup"),
                          r.get("same_results", {}).get("same"), r.get("same_results", {}).get("identical_frac")]
                         for k, r in methods.items()])
    er = parts.get("erank", {})
    if "fusionlab_s" in er:
        lines += [f"## Diff-eRank (N={er['n']}, d={er['d']}, {er['device']})", ""]
        lines += _table(["fusionlab s", "reference s (same device)", "speed-up", "reference s (CPU)", "speed-up vs CPU",
                         "fusionlab |err|", "reference |err|", "suite"],
                        [[er["fusionlab_s"], er.get(f"reference_{er['device']}_s"),
                          er.get("speedup_vs_reference_same_device"), er.get("reference_on_cpu_s"),
                          er.get("speedup_vs_reference_on_cpu"), er["fusionlab_abs_err"], er["reference_abs_err"],
                          er.get("suite")]])
    lines += ["## Targets (issue 17)", ""]
    lines += _table(["target", "value", "met"], [[t["target"], t["value"], t["met"]] for t in results.get("targets", [])])
    lines += ["## Skipped", "", *([f"- {s}" for s in results["skipped"]] or ["- nothing"]), ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path) -> None:
    for name, text in (("results.json", json.dumps(results, indent=1, default=str)), ("summary.md", summary(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="results dir (default: $OUT)")
    ap.add_argument("--scratch", default=None, help="big temporary files (default: a temp dir, deleted at the end)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="whole-run budget in seconds")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    args = ap.parse_args(argv)
    if not args.out:
        ap.error("give --out DIR (or set $OUT)")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but no CUDA GPU is visible; use --device cpu for the tiny CPU path")
    own_scratch = args.scratch is None
    args.scratch = args.scratch or tempfile.mkdtemp(prefix="fusionlab_gpu_check_")
    if args.device == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    try:
        results = run_parts(args)
    finally:
        if own_scratch:
            shutil.rmtree(args.scratch, ignore_errors=True)
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
