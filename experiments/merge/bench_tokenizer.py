"""Merging across tokenizers on the embedded models: does filling missing rows from fusionlab's alignment help?

Three measurements, each in one run (settings fixed before any number was seen: no tuning):

- ``union``: SmolLM2-135M-Instruct merged (linear, 0.5/0.5) with a *variant whose tokenizer gained tokens*:
  SmolLM2 + the N most frequent E2E words its tokenizer splits (added tokens, new rows = mean of their pieces'
  rows, then a short real fine-tune on E2E rows [0, 500)). The union vocabulary is SmolLM2's plus the N
  tokens, which SmolLM2 lacks: its rows for them are filled by ``fill`` = alignment (fusionlab: EVA projection of
  the variant's row, else pieces) | mean | zero | donor (mergekit: the variant's own row). All merges share the
  union tokenizer, so their per-text NLLs on held-out E2E rows [610, 690) are paired: Δ mean NLL/token with a
  95% paired-bootstrap interval (``fusionlab.metrics.stats.paired_bootstrap``), ppl = exp(NLL/token).
- ``surgeon``: SmolLM2 transplanted onto Gemma-3's tokenizer (``fusionlab.merge.tokenizer.transplant``),
  fill = alignment vs mean vs zero, same held-out texts under Gemma-3's tokenizer (paired again), plus nats/byte
  of the original SmolLM2 on its own tokens for scale.
- ``timing``: the union merge by fusionlab and by mergekit 0.1.5 (its ``tokenizer_source: union``) in fresh
  worker processes, same torch threads: wall time, peak RSS (VmHWM), and max rel diff to fusionlab's
  ``fill=donor`` (mergekit's own rule for a token only one model has).

    OMP_NUM_THREADS=1 python experiments/merge/bench_tokenizer.py --parts union surgeon timing
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAIN, TEST = (0, 500), (610, 690)  # E2E rows: the variant's fine-tune / the reported texts (dev rows 530-610 unused)
SURGEON_TEST = (610, 650)  # fewer texts for the 262k-vocabulary transplants (CPU time)


def log(*a) -> None:
    print(time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def make_variant(root: Path, n_tokens: int, steps: int, lr: float) -> Path:
    """SmolLM2 + ``n_tokens`` added E2E words (rows: mean of their pieces), fine-tuned ``steps`` AdamW steps (cached)."""
    from tokenizers import AddedToken
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusionlab.merge.derive import finetune
    from fusionlab.models import embedded_checkpoint
    from fusionlab.tasks.texts import load_text_set

    base = embedded_checkpoint("smollm2_135m")
    texts = load_text_set("e2e", start=TRAIN[0], stop=TRAIN[1])
    key = hashlib.sha256(json.dumps([n_tokens, steps, lr, TRAIN, "v1"]).encode()).hexdigest()[:12]
    out = root / f"smollm2_vocab_variant-{key}"
    if (out / "config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(str(base))
    counts = collections.Counter(w for t in texts for w in re.findall(r" [A-Za-z]{4,}", t))
    words = [w for w, _ in counts.most_common() if len(tok.encode(w)) >= 2][:n_tokens]
    log("variant tokens:", words)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    emb = model.get_input_embeddings().weight.detach().clone()
    pieces = {w: tok(w, add_special_tokens=False)["input_ids"] for w in words}
    tok.add_tokens([AddedToken(w, normalized=False, special=False) for w in words])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():  # the usual init of an added token: the mean of its pieces' rows
        for w in words:
            model.get_input_embeddings().weight[tok.convert_tokens_to_ids(w)] = emb[pieces[w]].mean(0)
    init = root / f"init-{key}"
    shutil.rmtree(init, ignore_errors=True)
    model.save_pretrained(str(init), safe_serialization=True)
    tok.save_pretrained(str(init))
    finetune(init, texts, out, steps=steps, lr=lr, batch_size=4, max_length=48, seed=0)
    shutil.rmtree(init)
    (out / "added_words.json").write_text(json.dumps(words))
    return out


@torch.no_grad()
def text_nll(model_dir: Path, texts: list[str], batch_size: int = 4, max_length: int = 96) -> dict[str, list[float]]:
    """Per text: summed NLL of every token after the first, token count, UTF-8 bytes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    nll, count = [], []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        logits = model(**enc).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        nll += loss.sum(1).tolist()
        count += (labels != -100).sum(1).tolist()
    return {"nll": nll, "tokens": count, "bytes": [len(t.encode()) for t in texts]}


def compare(scores: dict[str, dict[str, list[float]]], against: str) -> dict[str, dict]:
    """ppl per system; Δ mean NLL/token vs ``against`` with its paired 95% bootstrap interval (same tokens)."""
    from fusionlab.metrics.stats import paired_bootstrap

    out = {}
    ref = scores[against]
    for name, s in scores.items():
        n = sum(s["tokens"]) / len(s["tokens"])
        row = {"ppl": round(math.exp(sum(s["nll"]) / sum(s["tokens"])), 3), "tokens": sum(s["tokens"]),
               "nats_per_byte": round(sum(s["nll"]) / sum(s["bytes"]), 4)}
        if name != against and s["tokens"] == ref["tokens"]:
            d = paired_bootstrap([x / n for x in s["nll"]], [x / n for x in ref["nll"]], seed=0)
            row.update({f"dnll_vs_{against}": round(d.diff, 4), "ci95": [round(d.low, 4), round(d.high, 4)],
                        f"ppl_ratio_vs_{against}": round(math.exp(d.diff), 4),
                        "ppl_ratio_ci95": [round(math.exp(d.low), 4), round(math.exp(d.high), 4)]})
        out[name] = row
    return out


def union_cfg(variant: Path, out: Path, fill: str):
    from fusionlab.merge import MergeConfig
    from fusionlab.models import embedded_checkpoint

    return MergeConfig(method="linear", models=[{"model": str(embedded_checkpoint("smollm2_135m")), "parameters": {"weight": 0.5}},
                                                {"model": str(variant), "parameters": {"weight": 0.5}}],
                       tokenizer={"source": "union", "fill": fill}, output=str(out), overwrite=True, progress=False)


def part_union(root: Path, args) -> dict:
    from fusionlab.merge import merge
    from fusionlab.models import embedded_checkpoint
    from fusionlab.tasks.texts import load_text_set

    variant = make_variant(root, args.n_tokens, args.steps, args.lr)
    texts = load_text_set("e2e", start=TEST[0], stop=TEST[1])
    scores, info = {}, {}
    for fill in ("alignment", "mean", "zero", "donor"):
        out = root / f"union_{fill}"
        t = time.perf_counter()
        merge(union_cfg(variant, out, fill))
        info[fill] = {"merge_s": round(time.perf_counter() - t, 2),
                      **json.loads((out / "fusionlab_vocabulary.json").read_text())}
        scores[f"merged fill={fill}"] = text_nll(out, texts)
        log("union", fill, info[fill])
    scores["variant (its own tokenizer = the union's)"] = text_nll(variant, texts)
    scores["SmolLM2 alone (own tokenizer)"] = text_nll(embedded_checkpoint("smollm2_135m"), texts)
    from transformers import AutoTokenizer

    words = json.loads((variant / "added_words.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(root / "union_alignment"))
    new_ids = set(tok.convert_tokens_to_ids(words))
    n_new = sum(i in new_ids for t in texts for i in tok(t)["input_ids"])
    return {"texts": len(texts), "added_tokens": words, "new_token_occurrences": n_new, "merges": info,
            "table": compare(scores, "merged fill=alignment")}


def part_surgeon(root: Path, args) -> dict:
    from fusionlab.merge.tokenizer import transplant
    from fusionlab.models import embedded_checkpoint
    from fusionlab.tasks.texts import load_text_set

    texts = load_text_set("e2e", start=SURGEON_TEST[0], stop=SURGEON_TEST[1])
    scores, info = {}, {}
    for fill in args.surgeon_fills:
        out = root / f"surgeon_{fill}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        info[fill] = {**transplant("smollm2_135m", "model:gemma3_270m", out, fill=fill),
                      "seconds": round(time.perf_counter() - t, 2)}
        log("surgeon", fill, info[fill])
        scores[f"SmolLM2 on Gemma-3's tokenizer, fill={fill}"] = text_nll(out, texts)
        if fill != "alignment":
            shutil.rmtree(out)  # 0.6 GB each
    scores["SmolLM2 alone (own tokenizer)"] = text_nll(embedded_checkpoint("smollm2_135m"), texts)
    scores["Gemma-3-270M alone (own tokenizer)"] = text_nll(embedded_checkpoint("gemma3_270m"), texts)
    return {"texts": len(texts), "transplants": info,
            "table": compare(scores, "SmolLM2 on Gemma-3's tokenizer, fill=alignment")}


def worker(tool: str, cfg_path: str, out: str, threads: int) -> None:
    import yaml

    torch.set_num_threads(threads)
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(cfg_path).read_text()))
        start = time.perf_counter()
        run_merge(cfg, out, options=MergeOptions(quiet=True, write_model_card=False, num_threads=threads))
    else:
        from fusionlab.merge import merge

        raw = yaml.safe_load(Path(cfg_path).read_text())
        cfg = union_cfg(Path(raw["models"][1]["model"]), Path(out), raw["fusionlab_fill"])
        start = time.perf_counter()
        merge(cfg)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1)}))


def part_timing(root: Path, args) -> dict:
    import yaml

    from fusionlab.merge.io import CheckpointReader
    from fusionlab.models import embedded_checkpoint

    variant = make_variant(root, args.n_tokens, args.steps, args.lr)
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(embedded_checkpoint("smollm2_135m")), "parameters": {"weight": 0.5}},
                      {"model": str(variant), "parameters": {"weight": 0.5}}], "fusionlab_fill": "donor"}
    path = root / "union_mergekit.yml"
    path.write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "fusionlab_fill"}))
    fl_path = root / "union_fusionlab.yml"
    fl_path.write_text(yaml.safe_dump(cfg))
    rows = {}
    for rep in range(args.repeats):
        for tool, p in (("mergekit", path), ("fusionlab", fl_path)):
            out = root / f"timing_{tool}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            res = subprocess.run([sys.executable, __file__, "--worker", tool, str(p), str(out), "--threads",
                                  str(args.threads)], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{tool} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.setdefault(tool, []).append(r)
            log("timing", tool, r)
    a, b = CheckpointReader(root / "timing_fusionlab"), CheckpointReader(root / "timing_mergekit")
    diff = {}
    for name in b.names:
        x, y = a.get(name), b.get(name)
        diff[name] = float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)) if x.shape == y.shape else float("inf")
    return {"runs": rows, "max_rel_diff_vs_fusionlab_donor": max(diff.values()),
            "worst_tensor": max(diff, key=diff.get), "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["union", "surgeon", "timing"])
    ap.add_argument("--work", default="/tmp/bench_tokenizer")
    ap.add_argument("--json", default=str(HERE / "bench_tokenizer.json"))
    ap.add_argument("--n-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--surgeon-fills", nargs="+", default=["alignment", "mean", "zero"])
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "CONFIG", "OUT"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)
    torch.set_num_threads(args.threads)
    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cores",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load": os.getloadavg(),
              "command": " ".join(sys.argv), "torch_threads": args.threads}
    old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    for part in args.parts:
        t = time.perf_counter()
        result[part] = globals()[f"part_{part}"](root, args)
        result[part]["wall_s"] = round(time.perf_counter() - t, 1)
        result[part]["load_after"] = os.getloadavg()
        Path(args.json).write_text(json.dumps({**old, **result}, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
