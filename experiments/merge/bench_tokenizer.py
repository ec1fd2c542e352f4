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


def _peak_mb() -> float:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024


def surgeon_worker(tool: str, spec: str, out: str, threads: int) -> None:
    """One transplant of SmolLM2 onto Gemma-3's tokenizer in this fresh process: seconds and peak RSS on stdout.
    fusionlab: spec = fill or omp:<k>; mergekit: spec = its -k (its CLI defaults otherwise: -a omp, batch 512)."""
    from fusionlab.models import embedded_checkpoint

    torch.set_num_threads(threads)
    start = time.perf_counter()
    if tool == "mergekit":
        from mergekit.scripts.tokensurgeon import main as mk_main

        mk_main.main([str(embedded_checkpoint("smollm2_135m")), str(embedded_checkpoint("gemma3_270m")), out,
                      "-k", spec, "--num-threads", str(threads)], standalone_mode=False)
        info = {}
    else:
        from fusionlab.merge.tokenizer import transplant

        fill, _, k = spec.partition(":")
        info = transplant("smollm2_135m", "model:gemma3_270m", out, fill=fill, overwrite=True,
                          **({"omp_k": int(k)} if k else {}))
    print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "peak_rss_mb": round(_peak_mb(), 1),
                      **{k: v for k, v in info.items() if k.startswith("vocab/")}}))


def _run_worker(tool: str, spec: str, out: Path, threads: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, __file__, "--surgeon-worker", tool, spec, str(out), "--threads", str(threads)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"{tool} {spec} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def mergekit_probe(out: Path, k: int, seconds: float, threads: int) -> dict:
    """mergekit's tokensurgeon at its own defaults (-k 64) for ``seconds``, then stopped: its own progress bar's
    seconds per 512-token batch, the batches done, the peak RSS so far (it cannot finish here: see RESULTS.md)."""
    from fusionlab.models import embedded_checkpoint

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", "import sys; from mergekit.scripts.tokensurgeon import main; main()",
           str(embedded_checkpoint("smollm2_135m")), str(embedded_checkpoint("gemma3_270m")), str(out),
           "-k", str(k), "--num-threads", str(threads)]
    err = out.with_suffix(".log")
    with open(err, "w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        t0, peak = time.perf_counter(), 0.0
        while time.perf_counter() - t0 < seconds and p.poll() is None:
            time.sleep(2)
            try:
                peak = max(peak, next(int(x.split()[1]) for x in open(f"/proc/{p.pid}/status") if x.startswith("VmHWM")) / 1024)
            except (OSError, StopIteration):
                pass
        p.kill()
        p.wait()
    text = err.read_text()
    bars = re.findall(r"Approximating tokens:.*?(\d+)/(\d+) \[([0-9:]+)<[^,]*, *([0-9.]+)s/it\]", text)
    done, total, elapsed, per = bars[-1] if bars else (0, 0, "", "nan")
    return {"k": k, "ran_s": round(time.perf_counter() - t0, 1), "batches_done": int(done), "batches": int(total),
            "s_per_batch_512": float(per), "projected_s": round(float(per) * int(total or 0), 0),
            "peak_rss_mb_so_far": round(peak, 1)}


@torch.no_grad()
def tied_head_ablation(dirs: dict[str, Path], texts: list[str], filled: torch.Tensor) -> dict:
    """Input rows from one fill × output rows from another (the head untied), same model otherwise: held-out NLL
    per text and the mean softmax mass the filled (new) rows take at each predicted position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusionlab.merge.io import CheckpointReader

    name = "model.embed_tokens.weight"
    rows = {f: CheckpointReader(d).get(name).clone() for f, d in dirs.items()}
    first = next(iter(dirs.values()))
    tok = AutoTokenizer.from_pretrained(str(first))
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(str(first), dtype=torch.float32).eval()
    model.config.tie_word_embeddings = False
    scores, mass = {}, {}
    for fin, ein in rows.items():
        for fout, eout in rows.items():
            model.get_input_embeddings().weight = torch.nn.Parameter(ein, requires_grad=False)
            model.lm_head.weight = torch.nn.Parameter(eout, requires_grad=False)
            nll, count, m_sum, m_n = [], [], 0.0, 0
            for i in range(0, len(texts), 4):
                enc = tok(texts[i:i + 4], return_tensors="pt", padding=True, truncation=True, max_length=96)
                logits = model(**enc).logits[:, :-1].float()
                labels = enc["input_ids"][:, 1:].masked_fill(enc["attention_mask"][:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
                nll += loss.sum(1).tolist()
                count += (labels != -100).sum(1).tolist()
                share = (logits[..., filled].logsumexp(-1) - logits.logsumexp(-1)).exp()
                m_sum += float(share[labels != -100].sum())
                m_n += int((labels != -100).sum())
            key = f"input rows {fin}, output rows {fout}"
            scores[key] = {"nll": nll, "tokens": count, "bytes": [len(t.encode()) for t in texts]}
            mass[key] = round(m_sum / m_n, 4)
            log("ablation", key, round(math.exp(sum(nll) / sum(count)), 2), mass[key])
    table = compare(scores, "input rows mean, output rows mean")
    for key in table:
        table[key]["filled_rows_output_mass"] = mass[key]
    return table


def part_surgeon(root: Path, args) -> dict:
    from transformers import AutoTokenizer

    from fusionlab.merge.tokenizer import surfaces
    from fusionlab.models import embedded_checkpoint
    from fusionlab.tasks.texts import load_text_set

    texts = load_text_set("e2e", start=SURGEON_TEST[0], stop=SURGEON_TEST[1])
    scores, info, dirs = {}, {}, {}
    runs = [("fusionlab", f) for f in args.surgeon_fills] + [("mergekit", str(k)) for k in args.mergekit_k]
    for tool, spec in runs:
        out = root / f"surgeon_{tool}_{spec.replace(':', '_k')}"
        info[f"{tool} {spec}"] = _run_worker(tool, spec, out, args.threads)
        log("surgeon", tool, spec, info[f"{tool} {spec}"])
        label = f"fusionlab fill={spec}" if tool == "fusionlab" else f"mergekit tokensurgeon -a omp -k {spec}"
        scores[label] = text_nll(out, texts)
        dirs[label] = out
    scores["SmolLM2 alone (own tokenizer)"] = text_nll(embedded_checkpoint("smollm2_135m"), texts)
    scores["Gemma-3-270M alone (own tokenizer)"] = text_nll(embedded_checkpoint("gemma3_270m"), texts)
    result = {"texts": len(texts), "transplants": info, "table": compare(scores, "fusionlab fill=mean")}
    if args.mergekit_probe_s > 0:
        result["mergekit_default_k64_probe"] = mergekit_probe(root / "surgeon_mergekit_probe", 64, args.mergekit_probe_s,
                                                              args.threads)
        log("probe", result["mergekit_default_k64_probe"])
    # which Gemma ids SmolLM2 lacks (the filled rows): as plan_vocabulary matches them, by bytes
    s_surf = surfaces(AutoTokenizer.from_pretrained(str(embedded_checkpoint("smollm2_135m"))))
    s_index = {s: i for i, s in reversed(list(enumerate(s_surf))) if s}
    g_surf = surfaces(AutoTokenizer.from_pretrained(str(embedded_checkpoint("gemma3_270m"))))
    filled = torch.tensor([not (s and s in s_index) for s in g_surf[:262144]])
    abl = {f: dirs[f"fusionlab fill={f}"] for f in ("mean", "alignment", "omp") if f"fusionlab fill={f}" in dirs}
    result["tied_head_ablation"] = tied_head_ablation(abl, texts, filled.nonzero()[:, 0])
    result["filled_rows"] = int(filled.sum())
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)  # 0.6-1 GB each
    return result


def worker(tool: str, cfg_path: str, out: str, threads: int) -> None:
    """One union merge in this fresh process. Prints {seconds: the merge (plan + tensors; each tool's top-level
    imports excluded, as before), import_s: those imports, plan_s (fusionlab), peak_rss_mb} as the last line."""
    import yaml

    torch.set_num_threads(threads)
    t_import = time.perf_counter()
    if tool == "mergekit":
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        import_s = time.perf_counter() - t_import
        cfg = MergeConfiguration.model_validate(yaml.safe_load(Path(cfg_path).read_text()))
        start = time.perf_counter()
        run_merge(cfg, out, options=MergeOptions(quiet=True, write_model_card=False, num_threads=threads))
        extra = {}
    else:
        from fusionlab.merge import merge, plan

        import_s = time.perf_counter() - t_import
        raw = yaml.safe_load(Path(cfg_path).read_text())
        cfg = union_cfg(Path(raw["models"][1]["model"]), Path(out), raw["fusionlab_fill"])
        start = time.perf_counter()
        planned = plan(cfg)
        extra = {"plan_s": round(time.perf_counter() - start, 3)}
        merge(cfg, planned)
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024
    print(json.dumps({"seconds": round(seconds, 3), "import_s": round(import_s, 3), **extra,
                      "peak_rss_mb": round(peak, 1)}))


def _mean_ci(xs: list[float]) -> list[float]:
    """[mean, low, high]: Student-t 95% interval of the mean (n >= 2)."""
    from scipy import stats

    n, m = len(xs), sum(xs) / len(xs)
    if n < 2:
        return [round(m, 3)] * 3
    sd = (sum((x - m) ** 2 for x in xs) / (n - 1)) ** 0.5
    h = stats.t.ppf(0.975, n - 1) * sd / n ** 0.5
    return [round(m, 3), round(m - h, 3), round(m + h, 3)]


def _ratio_ci(num: list[float], den: list[float]) -> list[float]:
    """[geometric-mean ratio num/den, 95% low, high]: t interval of the paired log ratios (repeat i of each)."""
    logs = [math.log(a / b) for a, b in zip(num, den)]
    return [round(math.exp(v), 3) for v in _mean_ci(logs)]


def part_timing(root: Path, args) -> dict:
    """mergekit and fusionlab (each of ``--timing-fills``; donor = mergekit's rule) interleaved, ``--repeats`` rounds,
    each merge a fresh process: in-process merge seconds, whole-process seconds (python start to exit, imports
    included), peak RSS; the 1-min load average before each run; ratios mergekit / fusionlab with 95% intervals."""
    import yaml

    from fusionlab.merge.io import CheckpointReader
    from fusionlab.models import embedded_checkpoint

    variant = make_variant(root, args.n_tokens, args.steps, args.lr)
    cfg = {"merge_method": "linear", "dtype": "float32", "tokenizer_source": "union",
           "models": [{"model": str(embedded_checkpoint("smollm2_135m")), "parameters": {"weight": 0.5}},
                      {"model": str(variant), "parameters": {"weight": 0.5}}]}
    path = root / "union_mergekit.yml"
    path.write_text(yaml.safe_dump(cfg))
    runs = [("mergekit", "mergekit", path)]
    for fill in args.timing_fills:
        fl_path = root / f"union_fusionlab_{fill}.yml"
        fl_path.write_text(yaml.safe_dump({**cfg, "fusionlab_fill": fill}))
        runs.append(("fusionlab" if fill == "donor" else f"fusionlab fill={fill}", "fusionlab", fl_path))
    rows = {}
    for rep in range(args.repeats):
        for label, tool, p in runs:
            out = root / f"timing_{label.replace(' ', '_').replace('=', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            load = os.getloadavg()[0]
            t = time.perf_counter()
            res = subprocess.run([sys.executable, __file__, "--worker", tool, str(p), str(out), "--threads",
                                  str(args.threads)], capture_output=True, text=True)
            process_s = time.perf_counter() - t
            if res.returncode != 0:
                raise SystemExit(f"{label} failed:\n{res.stderr[-3000:]}")
            r = {**json.loads(res.stdout.strip().splitlines()[-1]), "process_s": round(process_s, 3),
                 "load1_before": round(load, 2)}
            rows.setdefault(label, []).append(r)
            log("timing", label, r)
    summary = {}
    for label, rs in rows.items():
        summary[label] = {key: _mean_ci([r[key] for r in rs]) for key in ("seconds", "process_s", "peak_rss_mb")}
        if label != "mergekit":
            for key in ("seconds", "process_s"):
                summary[label][f"speedup_{key}"] = _ratio_ci([r[key] for r in rows["mergekit"]], [r[key] for r in rs])
    a, b = CheckpointReader(root / "timing_fusionlab"), CheckpointReader(root / "timing_mergekit")
    diff = {}
    for name in b.names:
        x, y = a.get(name), b.get(name)
        diff[name] = float((x - y).abs().max() / y.abs().max().clamp(min=1e-12)) if x.shape == y.shape else float("inf")
    same_tok = {f: (root / "timing_fusionlab" / f).read_bytes() == (root / "timing_mergekit" / f).read_bytes()
                for f in ("tokenizer.json", "tokenizer_config.json") if (root / "timing_mergekit" / f).exists()}
    return {"runs": rows, "summary": summary, "max_rel_diff_vs_fusionlab_donor": max(diff.values()),
            "worst_tensor": max(diff, key=diff.get), "tokenizer_files_identical_to_mergekit": same_tok,
            "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", nargs="+", default=["union", "surgeon", "timing"])
    ap.add_argument("--work", default="/tmp/bench_tokenizer")
    ap.add_argument("--json", default=str(HERE / "bench_tokenizer.json"))
    ap.add_argument("--n-tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timing: interleaved rounds")
    ap.add_argument("--timing-fills", nargs="+", default=["donor"], help="timing: fusionlab fills (donor = mergekit's)")
    ap.add_argument("--surgeon-fills", nargs="+", default=["omp", "mean", "zero", "alignment", "omp:4"])
    ap.add_argument("--mergekit-k", nargs="*", type=int, default=[4], help="full mergekit tokensurgeon runs (its -k)")
    ap.add_argument("--mergekit-probe-s", type=float, default=120, help="seconds of mergekit at its default -k 64")
    ap.add_argument("--worker", nargs=3, metavar=("TOOL", "CONFIG", "OUT"))
    ap.add_argument("--surgeon-worker", nargs=3, metavar=("TOOL", "SPEC", "OUT"))
    args = ap.parse_args()
    if args.worker:
        return worker(*args.worker, args.threads)
    if args.surgeon_worker:
        return surgeon_worker(*args.surgeon_worker, args.threads)
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
