"""Benchmark: the full-vocabulary EVA alignment (Gemma-3-270M aux -> SmolLM2-135M main, all 262,144 aux
ids), its build time and peak memory, and how far its bfloat16 search changes the result.

    python experiments/eva/bench_align.py                    # build + cache the default entry, time, RSS
    python experiments/eva/bench_align.py --check-rows 4096  # + agreement with a float64 reference

The models, options and cache directory are the ones ``python -m fusionlab.run +experiment=<experiment>``
composes (default eva_addsub, with ``align_method.aux_vocab_cutoff=null``), so the entry built here is
the one that job loads. ``--check-rows N`` then runs the CSLS search without filters on a sub-problem
(N random aux rows, r(j) over them, every main target) in bfloat16 and in float32 and compares both
with an independent float64 reference: the share of rows whose top-1, top-10 set and top-10 order
match, and the largest score difference. The load average is printed
next to every time (the machine is shared).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_s() -> float:
    """CPU seconds of this process, all threads (a shared machine's load inflates wall time, not this)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def load() -> float:
    return os.getloadavg()[0]


def compose(experiment: str, overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir

    from fusionlab.run import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose("config", overrides=[f"+experiment={experiment}", *overrides])


@torch.no_grad()
def reference_topk(xm, zm, rows, targets, k, block=1024):
    """float64 CSLS top-k of ``rows`` (r(j) over the same rows), plain blocked code independent of csls_topk."""
    x = xm[rows].double()
    z = zm[targets].double()
    x, z = x / x.norm(dim=1, keepdim=True), z / z.norm(dim=1, keepdim=True)
    r = torch.full((len(targets),), -math.inf, dtype=torch.float64)
    for s in range(0, len(rows), block):
        r = torch.maximum(r, (x[s:s + block] @ z.T).amax(dim=0))
    vals, cols = [], []
    for s in range(0, len(rows), block):
        v, c = (2 * (x[s:s + block] @ z.T) - r).topk(k, dim=1)
        vals.append(v)
        cols.append(targets[c])
    return torch.cat(vals), torch.cat(cols)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--experiment", default="eva_addsub")
    ap.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    ap.add_argument("--rebuild", action="store_true", help="build even if the cache entry exists")
    ap.add_argument("--check-rows", type=int, default=0, help="rows compared with the float64 reference")
    args = ap.parse_args()
    from omegaconf import OmegaConf

    from fusionlab.align.methods import split_seed
    from fusionlab.align.vecmap import csls_topk, supervised_map, usable_cores
    from fusionlab.align.vocab import seed_dictionary, special_ids
    from fusionlab.ensemble import EnsembleConfig, align_members
    from fusionlab.models import cache_dir, load_model

    torch.set_grad_enabled(False)
    cfg = compose(args.experiment, ["align_method.aux_vocab_cutoff=null", *args.override])
    ens: EnsembleConfig = OmegaConf.to_object(cfg.ensemble)
    specs = [OmegaConf.to_object(cfg.model)] + [dataclasses.replace(s, name=n) for n, s in ens.aux.items()]
    options = OmegaConf.to_object(cfg.align_method)
    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "uptime": os.popen("uptime").read().strip(),
           "cores": usable_cores(), "torch": torch.__version__, "options": dataclasses.asdict(options)}
    loaded = [load_model(s) for s in specs]
    out["rss_after_models_mib"] = round(rss_mib())
    align_dir = Path(ens.cache_dir) if ens.cache_dir else cache_dir() / "align"
    start, load_before, cpu_before = time.perf_counter(), load(), cpu_s()
    alignment = align_members(loaded[0], loaded[1:2], options, {"progress": False}, align_dir, args.rebuild)[0]
    out.update({"build_wall_s": round(time.perf_counter() - start, 1), "build_cpu_s": round(cpu_s() - cpu_before, 1),
                "load_before": load_before,
                "load_after": load(), "peak_rss_mib": round(peak_rss_mib()), "cache_file": str(align_dir / f"{alignment.key}.safetensors"),
                "stats": alignment.stats})
    print(json.dumps(out, indent=1), flush=True)
    if not args.check_rows:
        return

    (main_m, main_t), (aux_m, aux_t) = loaded[0], loaded[1]
    from fusionlab.align.alignment import output_embeddings
    x, z = output_embeddings(aux_m).float().cpu(), output_embeddings(main_m).float().cpu()
    pairs = seed_dictionary(aux_t, main_t, options.seed_mode, x.shape[0], z.shape[0])
    train, _ = split_seed(pairs, options.holdout, options.seed)
    xm, zm = supervised_map(x, z, train[:, 0], train[:, 1], whiten=options.whiten, reweight=options.reweight,
                            dim=options.dim)
    n_aux = min(x.shape[0], len(aux_t))
    aux_special = special_ids(aux_t)
    rows = torch.tensor([i for i in range(n_aux) if i not in aux_special])
    main_special = {i for i in special_ids(main_t) if i < z.shape[0]} | set(range(len(main_t), z.shape[0]))
    targets = torch.tensor([j for j in range(z.shape[0]) if j not in main_special])
    excluded = torch.tensor(sorted(main_special), dtype=torch.long)
    torch.set_num_threads(usable_cores())
    # the check is a sub-problem (r(j) over a random sample of the aux rows, every main target) so that its
    # float64 reference fits a shared 2-core machine; the top-k's neighbourhood structure is the same
    sample = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:args.check_rows]].sort().values
    t0, l0 = time.perf_counter(), load()
    ref_v, ref_c = reference_topk(xm, zm, sample, targets, options.k)
    result = {"rows_checked": len(sample), "float64_reference_s": round(time.perf_counter() - t0, 1),
              "float64_load": [l0, load()]}
    for dtype in ("bfloat16", "float32"):
        t0, l0, c0 = time.perf_counter(), load(), cpu_s()
        cols, vals, _ = csls_topk(xm, zm, k=options.k, neighborhood=options.neighborhood, threshold=-math.inf,
                                  std_filter=None, excluded_cols=excluded, rows=sample, search_dtype=dtype)
        cols, vals = cols[sample], vals[sample]
        result[dtype] = {
            "csls_s": round(time.perf_counter() - t0, 1), "cpu_s": round(cpu_s() - c0, 1), "load": [l0, load()],
            "top1_agree": round(float((cols[:, 0] == ref_c[:, 0]).float().mean()), 6),
            "top10_set_agree": round(float((cols.sort(1).values == ref_c.sort(1).values).all(1).float().mean()), 6),
            "top10_order_agree": round(float((cols == ref_c).all(1).float().mean()), 6),
            "max_abs_score_diff_same_order": float((vals.double() - ref_v).abs()[(cols == ref_c).all(1)].max()),
        }
        print(dtype, result[dtype], flush=True)
    gaps = ref_v[:, :-1] - ref_v[:, 1:]
    result["reference_min_gap_within_top10"] = {"median": float(gaps.min(1).values.median()),
                                                "share_below_1e-4": float((gaps.min(1).values < 1e-4).float().mean())}
    print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
