"""tokensurgeon with an untied head (``head_fill=mean``): does it fix the tied-head failure, and which input fill?

SmolLM2-135M-Instruct moved onto Gemma-3-270M's 262,144-token tokenizer. The ablation in RESULTS.md showed that
with a tied head the filled rows (alignment / omp) take 35–95% of the predicted probability as *output* rows;
``head_fill=mean`` keeps those output rows at the mean row while the input rows follow ``fill``.

Rule fixed before the run: the candidate with the lowest mean NLL/token on the **dev** texts (E2E rows
[560, 600), never reported elsewhere) becomes the tokensurgeon default; every candidate is reported on the test
texts (E2E rows [610, 650), the earlier tables' texts) with the paired Δ vs the current default (fill=mean, tied).

    OMP_NUM_THREADS=1 PYTHONPATH=. python experiments/merge/bench_surgeon_head.py --work /tmp/bench_surgeon_head
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tokenizer import SURGEON_TEST, compare, text_nll  # noqa: E402

DEV = (560, 600)
CANDIDATES = {"fill=mean (tied; current default)": dict(fill="mean"),
              "fill=alignment, head_fill=mean": dict(fill="alignment", head_fill="mean"),
              "fill=omp k=64, head_fill=mean": dict(fill="omp", head_fill="mean")}


def main() -> None:
    from fusionlab.merge.tokenizer import transplant
    from fusionlab.tasks.texts import load_text_set

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/bench_surgeon_head")
    ap.add_argument("--json", default=str(Path(__file__).resolve().parent / "bench_surgeon_head.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    dev, test = load_text_set("e2e", start=DEV[0], stop=DEV[1]), load_text_set("e2e", start=SURGEON_TEST[0], stop=SURGEON_TEST[1])
    scores = {"dev": {}, "test": {}}
    info = {}
    for label, kw in CANDIDATES.items():
        out = root / label.split(" (")[0].replace("=", "_").replace(", ", "__").replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        info[label] = {**transplant("smollm2_135m", "model:gemma3_270m", out, **kw), "seconds": round(time.perf_counter() - t, 1)}
        scores["dev"][label], scores["test"][label] = text_nll(out, dev), text_nll(out, test)
        print(time.strftime("%H:%M:%S"), label, info[label]["seconds"], "s", flush=True)
        shutil.rmtree(out)
    base = next(iter(CANDIDATES))
    tables = {split: compare(s, base) for split, s in scores.items()}
    mean_nll = {lab: sum(v["nll"]) / sum(v["tokens"]) for lab, v in scores["dev"].items()}
    chosen = min(mean_nll, key=mean_nll.get)
    for split, table in tables.items():
        print(f"\n{split} ({len(dev if split == 'dev' else test)} texts)\n| candidate | ppl | Δ NLL/token vs {base} [95%] |\n|---|---|---|")
        for lab, row in table.items():
            ci = row.get("ci95")
            print(f"| {lab} | {row['ppl']:.1f} | " + (f"{row['dnll_vs_' + base]:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "—") + " |")
    print(f"\nchosen on dev: {chosen}")
    Path(args.json).write_text(json.dumps({"transplants": info, "tables": tables, "chosen_on_dev": chosen}, indent=1))


if __name__ == "__main__":
    main()
