"""The measurements of the prepared GPU check (issue 17), one function per part.

Each part takes the size profile (``PROFILES[device]``), a scratch dir for big files (checkpoints,
caches: never under the results dir) and a :class:`Deadline`; it returns a JSON-able dict and lists
in ``skipped`` every measurement it left out, with the reason. The same code runs the 1B/7B shapes
on a GPU and tiny shapes on a CPU (tests/gpu_check).

Library entry points used (kept few on purpose): ``python -m fusionlab.run +experiment=fusechat_pairwise``
(distillation on every ``trainer`` config), ``fusionlab.align.align`` + ``fusionlab.ensemble.EvaDecoder``,
``fusionlab.merge.MergeConfig`` / ``merge``, ``fusionlab.metrics.matrix_entropy``.
"""
from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) of the cards this check may meet (SXM parts).
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
HBM_BYTES_S = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.04e12}

# --- model shapes (transformers config kwargs) and the tokenizer each one uses -----------------
LLAMA32_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                  tie_word_embeddings=True)  # Llama-3.2-1B; 128,256 byte-level vocabulary
TINYLLAMA_1B = dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                    tie_word_embeddings=False)  # TinyLlama-1.1B; 32,000 SentencePiece vocabulary
LLAMA3_8B = dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rope_theta=500000.0,
                 tie_word_embeddings=False)
LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 tie_word_embeddings=False)
SOURCE_SMALL = dict(model_type="llama", hidden_size=1024, intermediate_size=2816, num_hidden_layers=12,
                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                   tie_word_embeddings=True)  # the smaller distillation source (0.17B)
TINY = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
TINY_AUX = dict(TINY, hidden_size=48, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=False)

# tokenizer name -> (style, vocabulary size); "bl" = byte-level BPE, "sp" = SentencePiece-style
PROFILES: dict[str, dict[str, Any]] = {
    "cuda": {
        "tokenizers": {"bl": ("byte_level", 128256), "sp": ("sentencepiece", 32000)},
        "dtype": "bfloat16",
        "distill": {"pivot": (LLAMA32_1B, "bl"), "source": (SOURCE_SMALL, "sp"), "steps": 20, "resume_steps": 2,
                    "batch_size": 16, "max_length": 1024, "limit": None, "warmup_steps": 3,
                    "fit_timeout_s": 150, "resume_timeout_s": 110},
        "eva": {"pairs": {"1b": ((LLAMA32_1B, "bl"), (TINYLLAMA_1B, "sp")),
                          "7b": ((LLAMA3_8B, "bl"), (LLAMA2_7B, "sp"))},
                "batches": [1, 16], "new_tokens": 128, "compile": True,
                # estimated seconds per plan item at the 2x1B scale (both members), scaled up for bigger pairs
                "cost_s": {"load": 15, "eva": 15, "hf_dynamic": 8, "hf_static": 8, "hf_static_compiled": 80}},
        "merge": {"shape": (LLAMA32_1B, "bl"), "devices": ["cuda", "cpu"]},
        "erank": {"n": 2048, "d": 4096, "reps": 2, "reference_on_cpu": True},
    },
    "cpu": {
        "tokenizers": {"bl": ("byte_level", 1024), "sp": ("sentencepiece", 800)},
        "dtype": "float32",
        "distill": {"pivot": (TINY, "bl"), "source": (TINY_AUX, "sp"), "steps": 2, "resume_steps": 1,
                    "batch_size": 2, "max_length": 48, "limit": 4, "warmup_steps": 0,
                    "fit_timeout_s": 120, "resume_timeout_s": 120},
        "eva": {"pairs": {"tiny": ((TINY, "bl"), (TINY_AUX, "sp"))}, "batches": [1, 2], "new_tokens": 6,
                "compile": False, "cost_s": {"load": 2, "eva": 2, "hf_dynamic": 1, "hf_static": 1}},
        "merge": {"shape": (TINY, "bl"), "devices": ["cpu", "cpu"]},
        "erank": {"n": 128, "d": 256, "reps": 1, "reference_on_cpu": False},
    },
}
STRATEGIES = ("gpu", "fsdp", "deepspeed_z2", "deepspeed_z3_offload")
PROMPT = ("Question: Joan found 70 seashells on the beach. She gave Sam some of her seashells. She has 27 "
          "seashells left. How many seashells did she give to Sam?\nAnswer: Let's think step by step.")


class PartTimeout(Exception):
    pass


class Deadline:
    """Wall-clock budget of one part: ``left()`` seconds remain; ``armed()`` raises PartTimeout when spent."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds


@contextmanager
def armed(deadline: Deadline) -> Iterator[None]:
    """SIGALRM at the deadline (main thread only): a part that overruns stops at its next Python bytecode."""
    def _raise(signum, frame):
        raise PartTimeout("time guard: the part ran past its budget")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, max(deadline.left(), 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def gpu_name() -> str | None:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def card_figure(table: dict[str, float]) -> float | None:
    name = gpu_name() or ""
    return next((v for k, v in table.items() if k in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def build_model(shape: dict[str, Any], vocab: int, device: str, dtype: str, seed: int = 0):
    """A random causal LM of ``shape``, initialised directly on ``device`` (a 7B model in a second on a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(shape)
    cfg = AutoConfig.for_model(kw.pop("model_type"), vocab_size=vocab, **kw)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return model.eval()


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def step_bytes(model) -> int:
    """Weight bytes one decoding step reads: all but an untied input embedding (only its looked-up rows are read)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    untied = emb.data_ptr() != head.data_ptr()
    return weight_bytes(model) - (emb.numel() * emb.element_size() if untied else 0)


def matmul_params(shape: dict[str, Any], vocab: int) -> int:
    """Parameters that take part in a token's matmuls (every layer + lm_head; not the embedding lookup)."""
    h, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = shape.get("head_dim") or h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    return layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h


def load_tokenizers(tok_dirs: dict[str, Path]):
    from transformers import AutoTokenizer

    return {name: AutoTokenizer.from_pretrained(d) for name, d in tok_dirs.items()}


# ------------------------------------------------------------------------------------------------
# 1. FuseChat distillation fits on every trainer config, through the command line
# ------------------------------------------------------------------------------------------------

def _hydra(value: Any) -> str:
    """A Python value as a Hydra override value."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_hydra(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return "'" + value.replace("'", "\\'") + "'"
    return repr(value)


def distill_command(p: dict[str, Any], tok_dirs: dict[str, Path], device: str, strategy: str, run_dir: Path,
                    cache: Path, max_steps: int, probe: Path, resume: bool) -> list[str]:
    d = p["distill"]
    (pivot, pivot_tok), (source, source_tok) = d["pivot"], d["source"]
    trainer = ["trainer=cpu"] if strategy == "cpu" else [f"trainer={strategy}", "trainer.devices=1"]
    return [sys.executable, "-m", "fusionlab.run", "+experiment=fusechat_pairwise", "logger=csv",
            "model=tiny_llama", "model.name=pivot", f"model.tokenizer={tok_dirs[pivot_tok]}",
            f"model.config={_hydra(pivot)}", f"model.device={device}", "model.dtype=float32",
            "~model@distill.sources.gemma3_270m", "+model@distill.sources.source=tiny_llama",
            "distill.sources.source.name=source", f"distill.sources.source.tokenizer={tok_dirs[source_tok]}",
            f"distill.sources.source.config={_hydra(source)}", f"distill.sources.source.device={device}",
            f"distill.sources.source.dtype={p['dtype']}", "distill.sources.source.seed=1",
            "distill.sources.source.use_chat_template=false",
            "distill.mapping.min_vocab_coverage=0",  # random-weight models: their top-k ids are noise
            f"distill.data.limit={_hydra(d['limit'])}", f"distill.data.max_length={d['max_length']}",
            f"distill.batch_size={d['batch_size']}", f"distill.cache_dir={cache}", "distill.export_model=false",
            f"distill.resume={'auto' if resume else 'false'}",
            # the resume writes its probe to another file: a neutral difference the resume guard would refuse
            *(["resume_mismatch=allow"] if resume else []),
            *trainer, f"trainer.max_steps={max_steps}", "trainer.max_epochs=-1", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=1", f"callbacks.model_checkpoint.every_n_train_steps={d['steps']}",
            "~callbacks.progress_bar",
            f"+callbacks.gpu_probe={_hydra({'_target_': 'fit_probe.FitProbe', 'path': str(probe)})}",
            f"hydra.run.dir={run_dir}"]


def run_command(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` in its own process group; kill the group at ``timeout`` or if this process is interrupted."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    tail = log.read_text(errors="replace")[-3000:]
    return {"rc": rc, "seconds": round(time.perf_counter() - t0, 2), "log_tail": tail if rc != 0 else None}


def _fit_figures(probe: dict[str, Any], metrics: dict[str, Any], flops_per_token: Callable[[int], float],
                 warmup: int) -> dict[str, Any]:
    steps = probe.get("steps", [])
    steady = steps[warmup:] if len(steps) > warmup else steps
    secs = sum(s["seconds"] for s in steady)
    tokens = sum(s["tokens"] for s in steady)
    flops = sum(s["tokens"] * flops_per_token(s["seq_len"]) for s in steady)
    peak = card_figure(PEAK_BF16)
    losses = [s["loss"] for s in steps]
    return {"steps": len(steps), "global_step": probe.get("global_step"), "strategy_class": probe.get("strategy"),
            "precision": probe.get("precision"), "steady_steps": len(steady),
            "step_s": round(secs / max(len(steady), 1), 4),
            "tokens_per_s": round(tokens / secs, 1) if secs else None,
            "padding_frac": round(1 - sum(s["tokens"] for s in steps) / max(sum(s["padded_tokens"] for s in steps), 1), 3),
            "mfu": round(flops / secs / peak, 4) if secs and peak else None,
            "peak_allocated_gib": probe.get("peak_allocated_gib"), "peak_reserved_gib": probe.get("peak_reserved_gib"),
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "job_tokens_per_s": metrics.get("fit/tokens_per_s"), "job_steps": metrics.get("fit/steps"),
            "job_resumed": metrics.get("fit/resumed"), "job_status": metrics.get("status")}


def distill(p: dict[str, Any], device: str, strategies: list[str], tok_dirs: dict[str, Path], scratch: Path,
            logs: Path, deadline: Deadline, out: dict[str, Any]) -> dict[str, Any]:
    """A fit of ``steps`` steps and a resume for ``resume_steps`` per strategy (one process each, as a user runs it)."""
    d = p["distill"]
    pivot, pivot_tok = d["pivot"]
    vocab = p["tokenizers"][pivot_tok][1]
    n_matmul = matmul_params(pivot, vocab)

    def flops_per_token(seq: int) -> float:  # PaLM: 6 per matmul parameter + attention 12 * layers * hidden * seq
        return 6 * n_matmul + 12 * pivot["num_hidden_layers"] * pivot["hidden_size"] * seq

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "disabled", "FUSIONLAB_CACHE": str(scratch / "cache"), "TOKENIZERS_PARALLELISM": "false"}
    out.update({"pivot_matmul_params": n_matmul, "strategies": {}, "skipped": []})
    for strategy in strategies:
        if device == "cpu" and strategy != "cpu":
            out["skipped"].append(f"{strategy}: needs a CUDA GPU (Lightning's GPU strategies refuse the CPU)")
            continue
        if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
            out["skipped"].append(f"{strategy}: deepspeed is not installed (bring its wheel: experiments/gpu/prepare.sh)")
            continue
        if not deadline.allows(30):
            out["skipped"].append(f"{strategy}: no time left in the budget")
            continue
        run_dir = scratch / "distill" / strategy
        shutil.rmtree(run_dir, ignore_errors=True)
        rec: dict[str, Any] = {}
        for phase, steps, timeout in (("fit", d["steps"], d["fit_timeout_s"]),
                                      ("resume", d["steps"] + d["resume_steps"], d["resume_timeout_s"])):
            probe = run_dir / f"probe_{phase}.json"
            cmd = distill_command(p, tok_dirs, device, strategy, run_dir, scratch / "distill_cache", steps, probe,
                                  resume=phase == "resume")
            res = run_command(cmd, min(timeout, deadline.left()), logs / f"distill_{strategy}_{phase}.log", env)
            metrics_path = run_dir / "metrics.json"
            metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
            probe_rec = json.loads(probe.read_text()) if probe.is_file() else {}
            rec[phase] = {"rc": res["rc"], "process_s": res["seconds"],
                          **_fit_figures(probe_rec, metrics, flops_per_token, d["warmup_steps"] if phase == "fit" else 0)}
            if phase == "fit":
                rec[phase].update({k: metrics[k] for k in ("time/representations_s", "time/alignment_s")
                                   if k in metrics})
            if res["log_tail"]:
                rec[phase]["log_tail"] = res["log_tail"]
            metrics_path.unlink(missing_ok=True)  # the resume writes its own
            if res["rc"] != 0:
                break
        fit, resume = rec.get("fit", {}), rec.get("resume", {})
        rec["ok"] = bool(fit.get("rc") == 0 and fit.get("loss_finite") and fit.get("job_steps") == d["steps"]
                         and resume.get("rc") == 0 and resume.get("loss_finite") and resume.get("job_resumed") is True
                         and resume.get("job_steps") == d["steps"] + d["resume_steps"]
                         and resume.get("steps") == d["resume_steps"])
        out["strategies"][strategy] = rec
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1B + AdamW: ~15 GB per strategy
    return out


# ------------------------------------------------------------------------------------------------
# 2. EVA decoding speed: ensemble vs each member vs the HBM bound; static cache / torch.compile
# ------------------------------------------------------------------------------------------------

def _eva_tok_s(decoder, prompts, n: int) -> float:
    if hasattr(decoder, "eos"):
        decoder.eos = set()  # random models: decode all n tokens
    decoder.generate(prompts, max_new_tokens=min(4, n))  # kernels, allocator, cuBLAS handles
    out = decoder.generate(prompts, max_new_tokens=n)
    return round(sum(out.new_tokens) / out.seconds, 2)


def _hf_tok_s(model, tok, batch: int, n: int, full_warmup: bool, **kwargs) -> tuple[float, float]:
    """(tokens/s, warm-up seconds) of HF ``generate``; ``full_warmup`` warms up at full length (compiled graphs)."""
    enc = tok([PROMPT] * batch, return_tensors="pt").to(model.device)

    def go(m: int) -> float:
        sync()
        t = time.perf_counter()
        model.generate(**enc, max_new_tokens=m, min_new_tokens=m, do_sample=False, **kwargs)
        sync()
        return time.perf_counter() - t

    warm = go(n if full_warmup else 4)
    return round(batch * n / go(n), 2), round(warm, 2)


HF_VARIANTS = {  # name -> (generate kwargs, warm up at full length: compiled graphs are per cache length)
    "hf_dynamic": ({}, False),
    "hf_static": ({"cache_implementation": "static", "disable_compile": True}, False),
    "hf_static_compiled": ({"cache_implementation": "static"}, True),  # torch.compile + CUDA graphs
}


def eva_plan(pairs: list[str], batches: list[int], compile_: bool) -> list[tuple[str, int, str]]:
    """Measurements in priority order: every pair's EVA loops and HF generate, the static + compiled
    variant only at the first pair's smallest batch (each compilation costs about a minute)."""
    plan = []
    for i, pair in enumerate(pairs):
        plan += [(pair, b, "eva") for b in batches] + [(pair, b, v) for b in batches for v in ("hf_dynamic", "hf_static")]
        if i == 0 and compile_:
            plan.append((pair, batches[0], "hf_static_compiled"))
    return plan


def _eva_pair(p, pair: str, device: str, toks, scratch: Path, rec: dict[str, Any]):
    from fusionlab.align import align

    (main_shape, main_tok), (aux_shape, aux_tok) = p["eva"]["pairs"][pair]
    vocab = {n: p["tokenizers"][n][1] for n in (main_tok, aux_tok)}
    t0 = time.perf_counter()
    main = (build_model(main_shape, vocab[main_tok], device, p["dtype"], seed=0), toks[main_tok])
    aux = (build_model(aux_shape, vocab[aux_tok], device, p["dtype"], seed=1), toks[aux_tok])
    for m, t in (main, aux):
        m.generation_config.pad_token_id = t.pad_token_id
    rec.update({"build_s": round(time.perf_counter() - t0, 2), "batches": {},
                "main": {"vocab": vocab[main_tok], "gib": round(weight_bytes(main[0]) / 2**30, 2)},
                "aux": {"vocab": vocab[aux_tok], "gib": round(weight_bytes(aux[0]) / 2**30, 2)}})
    t0 = time.perf_counter()
    al = align(*aux, *main, "vecmap_csls", cache_dir=scratch / "align",
               aux_eos_ids=[aux[1].eos_token_id] if aux[1].eos_token_id is not None else [])
    rec["align_s"] = round(time.perf_counter() - t0, 2)
    return main, aux, al


def eva(p: dict[str, Any], device: str, tok_dirs: dict[str, Path], scratch: Path, deadline: Deadline,
        out: dict[str, Any]) -> dict[str, Any]:
    from fusionlab.ensemble import EvaDecoder

    e = p["eva"]
    toks = load_tokenizers(tok_dirs)
    bw = card_figure(HBM_BYTES_S) if device == "cuda" else None
    out.update({"hbm_bytes_per_s": bw, "pairs": {}, "skipped": [
        "ensemble with a static KV cache / torch.compile: EvaDecoder keeps a DynamicCache (variable-width steps, "
        "rollbacks) and exposes no static-cache option; 'ensemble_static_bound_tok_s' is what the members' "
        "static-cache steps would allow back to back"]})
    compile_ = e["compile"] and device == "cuda"
    if not compile_:
        out["skipped"].append("hf_static_compiled: torch.compile's CUDA graphs need a GPU")
    elif len(e["batches"]) > 1 or len(e["pairs"]) > 1:
        out["skipped"].append("hf_static_compiled beyond the first pair's batch 1: about a minute of compilation "
                              "each, more than the budget holds")
    loaded, members, bad = None, None, set()
    for pair, batch, what in eva_plan(list(e["pairs"]), e["batches"], compile_):
        if pair in bad:
            continue
        (main_shape, main_tok), (aux_shape, aux_tok) = e["pairs"][pair]
        sizes = {n: p["tokenizers"][n][1] for n in (main_tok, aux_tok)}
        scale = max(1.0, (matmul_params(main_shape, sizes[main_tok]) + matmul_params(aux_shape, sizes[aux_tok])) / 2.6e9)
        cost = scale * (e["cost_s"][what] + (0 if pair == loaded else e["cost_s"]["load"]))
        if not deadline.allows(cost):
            out["skipped"].append(f"{pair} batch {batch} {what}: no time left in the budget (needs ~{cost:.0f} s)")
            continue
        if pair != loaded:
            main = aux = al = members = loaded = None
            free(device)
            need = 2 * (matmul_params(main_shape, sizes[main_tok]) + matmul_params(aux_shape, sizes[aux_tok]))
            if device == "cuda" and torch.cuda.mem_get_info()[0] < 1.5 * need + 8 * 2**30:
                out["skipped"].append(f"{pair}: {need / 2**30:.0f} GiB of weights do not fit the free GPU memory")
                bad.add(pair)
                continue
            out["pairs"][pair] = {}
            members, loaded = _eva_pair(p, pair, device, toks, scratch, out["pairs"][pair]), pair
        main, aux, al = members
        r = out["pairs"][pair]["batches"].setdefault(str(batch), {})
        n = e["new_tokens"]
        if what == "eva":
            prompts = [PROMPT] * batch
            r["main_tok_s"] = _eva_tok_s(EvaDecoder(main, [], []), prompts, n)
            r["aux_tok_s"] = _eva_tok_s(EvaDecoder(aux, [], []), prompts, n)
            r["ensemble_tok_s"] = _eva_tok_s(EvaDecoder(main, [aux], [al], topk=320, drop=5), prompts, n)
            # (main step time + aux step time) / ensemble step time: 1.0 = no overhead beyond the members
            r["ensemble_speed_vs_members"] = round((1 / r["main_tok_s"] + 1 / r["aux_tok_s"]) * r["ensemble_tok_s"], 3)
            if bw:
                b_main, b_aux = step_bytes(main[0]), step_bytes(aux[0])  # the bound ignores KV-cache reads
                r["hbm_bound_main_tok_s"] = round(batch * bw / b_main, 1)
                r["hbm_bound_aux_tok_s"] = round(batch * bw / b_aux, 1)
                r["hbm_bound_ensemble_tok_s"] = round(batch * bw / (b_main + b_aux), 1)
                r["ensemble_frac_of_hbm_bound"] = round(r["ensemble_tok_s"] / r["hbm_bound_ensemble_tok_s"], 3)
            continue
        kwargs, full = HF_VARIANTS[what]
        for role, (m, t) in (("main", main), ("aux", aux)):
            try:
                r[f"{role}_{what}_tok_s"], r[f"{role}_{what}_warmup_s"] = _hf_tok_s(m, t, batch, n, full, **kwargs)
            except PartTimeout:
                raise
            except Exception as err:  # noqa: BLE001 — record and go on: one variant must not sink the part
                r[f"{role}_{what}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        best = "hf_static_compiled" if "main_hf_static_compiled_tok_s" in r else "hf_static"
        if f"main_{best}_tok_s" in r and f"aux_{best}_tok_s" in r:
            r["ensemble_static_bound_tok_s"] = round(1 / (1 / r[f"main_{best}_tok_s"] + 1 / r[f"aux_{best}_tok_s"]), 2)
            r["ensemble_static_bound_from"] = best
            if "hbm_bound_ensemble_tok_s" in r:
                r["ensemble_static_bound_frac_of_hbm_bound"] = round(
                    r["ensemble_static_bound_tok_s"] / r["hbm_bound_ensemble_tok_s"], 3)
    main = aux = al = members = None
    free(device)
    return out


# ------------------------------------------------------------------------------------------------
# 3. TIES and SCE merges of three checkpoints: merge.device=cuda vs CPU, same results
# ------------------------------------------------------------------------------------------------

def _same_results(a: Path, b: Path, device: str) -> dict[str, Any]:
    """Compare two merged checkpoints tensor by tensor; "same" = every difference within one bf16 ulp of the tensor's scale."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict[str, tuple[Path, str]]:
        names = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                names.update({k: (f, k) for k in st.keys()})
        return names

    ta, tb = tensors(a), tensors(b)
    if set(ta) != set(tb):
        return {"same": False, "error": f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"}
    identical = total = 0
    worst = 0.0
    for name, (fa, _) in ta.items():
        with safe_open(fa, "pt", device=device) as sa, safe_open(tb[name][0], "pt", device=device) as sb:
            x, y = sa.get_tensor(name).float(), sb.get_tensor(name).float()
        identical += int((x == y).sum())
        total += x.numel()
        scale = float(x.abs().max().clamp_min(1e-30))
        worst = max(worst, float((x - y).abs().max()) / scale)
    return {"same": worst <= 2.0 ** -7, "identical_frac": round(identical / total, 6), "max_diff_rel_to_scale": worst,
            "tensors": len(ta)}


def merge(p: dict[str, Any], device: str, tok_dirs: dict[str, Path], scratch: Path, deadline: Deadline,
          out: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from fusionlab.merge import MergeConfig, merge as run_merge

    shape, tok_name = p["merge"]["shape"]
    root = scratch / "merge"
    shutil.rmtree(root, ignore_errors=True)
    t0 = time.perf_counter()
    model = build_model(shape, p["tokenizers"][tok_name][1], device, p["dtype"], seed=0)
    tok = AutoTokenizer.from_pretrained(tok_dirs[tok_name])
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dirs = {}
    for i, name in enumerate(["base", "ft_a", "ft_b", "ft_c"]):
        if i:  # a "fine-tune": base + seeded deltas of ~10% of the weights' scale
            g = torch.Generator(device=device).manual_seed(i)
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    v.copy_(base[k] + 0.002 * torch.randn(v.shape, generator=g, device=device, dtype=v.dtype))
        dirs[name] = root / name
        model.save_pretrained(dirs[name], safe_serialization=True)
        tok.save_pretrained(dirs[name])
    out.update({"params": sum(v.numel() for v in base.values()), "methods": {}, "skipped": []})
    del model, base
    free(device)
    out["build_and_save_s"] = round(time.perf_counter() - t0, 2)
    devices = p["merge"]["devices"]
    if devices[1] == devices[0]:
        out["skipped"].append("merge.device=cuda: no GPU; the same-results check compares two CPU runs")
    methods = {"ties": ({"weight": 1.0, "density": 0.5}, {}), "sce": ({}, {"select_topk": 0.5})}
    for method, (per_model, shared) in methods.items():
        rec: dict[str, Any] = {}
        outputs = []
        for j, dev in enumerate(devices):
            if not deadline.allows(10):
                out["skipped"].append(f"{method} on {dev}: no time left in the budget")
                continue
            target = root / f"out_{method}_{j}_{dev}"
            cfg = MergeConfig.from_dict({"method": method, "base": str(dirs["base"]), "output": str(target),
                                         "models": [{"model": str(dirs[n]), "parameters": dict(per_model)}
                                                    for n in ("ft_a", "ft_b", "ft_c")],
                                         "parameters": dict(shared), "device": dev, "dtype": p["dtype"],
                                         "overwrite": True, "progress": False})
            sync()
            t = time.perf_counter()
            run_merge(cfg)
            sync()
            rec[f"{dev}_s" if dev not in [d for d, _ in outputs] else f"{dev}_repeat_s"] = round(time.perf_counter() - t, 2)
            outputs.append((dev, target))
        if len(outputs) == 2:
            rec["same_results"] = _same_results(outputs[0][1], outputs[1][1], device)
            if "cuda_s" in rec and "cpu_s" in rec:
                rec["gpu_speedup"] = round(rec["cpu_s"] / rec["cuda_s"], 2)
        out["methods"][method] = rec
        for _, target in outputs:
            shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------------
# 4. Diff-eRank at N x d: fusionlab vs the reference SVD formulation (and the metric suite, if present)
# ------------------------------------------------------------------------------------------------

def reference_entropy(rep: torch.Tensor) -> float:
    """Diff-eRank's published formulation (waltonfuture/Diff-eRank): SVD of the d x d covariance in float32."""
    z = rep - rep.mean(dim=0)
    z = torch.nn.functional.normalize(z / torch.norm(z, p=2, dim=1, keepdim=True), dim=1)
    cov = z.T @ z / z.shape[0]
    s = torch.svd(cov / torch.trace(cov))[1]
    return -(s * torch.log(s)).nansum().item()


def true_entropy(rep: torch.Tensor) -> float:
    """Independent float64 path: singular values of the centred unit-row matrix."""
    z = rep.double() - rep.double().mean(0)
    z = z / z.norm(dim=1, keepdim=True)
    lam = torch.linalg.svdvals(z) ** 2
    q = lam / lam.sum()
    return float(-torch.special.xlogy(q, q).sum())


def hidden_like(n: int, d: int, device: str, seed: int = 0) -> torch.Tensor:
    """Token representations with a decaying spectrum and a large shared mean, like LLM hidden states."""
    g = torch.Generator().manual_seed(seed)
    rep = torch.randn(n, d, generator=g) * (1.0 + torch.arange(d, dtype=torch.float32)) ** -0.5
    return (rep + 3.0 * torch.randn(1, d, generator=g)).to(device)


def _best_time(fn: Callable[[], Any], reps: int) -> tuple[float, Any]:
    value = fn()  # warm-up: kernels, solver workspaces
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        value = fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), value


def erank(p: dict[str, Any], device: str, deadline: Deadline, out: dict[str, Any]) -> dict[str, Any]:
    from fusionlab.metrics import matrix_entropy

    e = p["erank"]
    rep = hidden_like(e["n"], e["d"], device)
    truth = true_entropy(rep)
    t_fus, h_fus = _best_time(lambda: matrix_entropy(rep), e["reps"])
    t_ref, h_ref = _best_time(lambda: reference_entropy(rep), e["reps"])
    out.update({"n": e["n"], "d": e["d"], "device": device, "truth_entropy": truth,
                "fusionlab_s": round(t_fus, 5), "fusionlab_abs_err": abs(h_fus - truth),
                f"reference_{device}_s": round(t_ref, 5), "reference_abs_err": abs(h_ref - truth),
                "speedup_vs_reference_same_device": round(t_ref / t_fus, 1), "skipped": []})
    if e["reference_on_cpu"] and device != "cpu" and deadline.allows(30):
        t_cpu, _ = _best_time(lambda: reference_entropy(rep.cpu()), 0)
        out["reference_on_cpu_s"] = round(t_cpu, 4)
        out["speedup_vs_reference_on_cpu"] = round(t_cpu / t_fus, 1)
    try:  # the representation-metric suite (token-level metrics), where this checkout has it
        from fusionlab.metrics import representation as R
    except ImportError as err:
        out["skipped"].append(f"metric suite: not in this checkout ({err})")
        return out
    suite = {}
    batch = rep.unsqueeze(0)
    for name in ("prompt_entropy", "curvature", "nuclear_norm"):
        fn = getattr(R, name, None)
        if fn is None or not deadline.allows(5):
            out["skipped"].append(f"metric suite {name}: {'not found' if fn is None else 'no time left'}")
            continue
        try:
            suite[f"{name}_s"] = round(_best_time(lambda: fn(batch), e["reps"])[0], 5)
        except Exception as err:  # noqa: BLE001 — the suite's API is young: record, do not fail the check
            out["skipped"].append(f"metric suite {name}: {type(err).__name__}: {str(err)[:200]}")
    out["suite"] = suite
    return out
