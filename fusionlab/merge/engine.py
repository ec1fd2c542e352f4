"""The streaming merge engine: plan (validate everything), then merge tensor by tensor.

All checks that can fail — unknown method or parameter, missing required parameter, missing
tensor, shape or architecture mismatch — run in the planning pass before anything is written.
NaN/inf in an input or the output stops the merge; the output appears only when the whole
merge succeeded (temp dir renamed into place).
"""
from __future__ import annotations

import ctypes
import json
import logging
import platform
import sys
import threading
import time
import zlib
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_dir
from fusionlab.merge import params as P
from fusionlab.merge.io import ST_DTYPES, CheckpointReader, StreamingShardWriter, copy_aux_files, parse_dtype, parse_size
from fusionlab.merge.methods import Method, apply_method, get_method, is_finite

log = logging.getLogger(__name__)


@dataclass
class InputModel:
    """One model to merge and its own parameters (highest precedence)."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeConfig:
    """A merge: mirrors ``merge:`` in the Hydra config and mergekit's YAML (``merge_method`` → ``method``)."""

    method: str
    models: list[InputModel]
    output: str
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # global values (lowest precedence)
    dtype: str = "auto"  # output dtype; auto = the reference model's stored dtype. Compute is fp32.
    device: str = "cpu"
    shard_size: int | str = "5GB"
    tokenizer_source: str | None = None  # which input's config/tokenizer to copy (default: base, else first model)
    seed: int = 0  # random methods (dare, della): a generator per tensor seeded by (seed, tensor name)
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MergeConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise FusionlabError(f"Unknown merge option(s) {unknown}; valid options are {sorted(known)}.")
        for key in ("method", "models", "output"):
            if d.get(key) in (None, "", []):
                raise FusionlabError(f"merge.{key} must be set (see conf/merge_method/ and docs/merge.md).")
        models = []
        for m in d["models"]:
            if isinstance(m, str):
                m = {"model": m}
            bad = sorted(set(m) - {"model", "parameters"})
            if bad or "model" not in m:
                raise FusionlabError(f"Each merge.models entry needs `model` (+ optional `parameters`); got keys {sorted(m)}.")
            models.append(InputModel(str(m["model"]), dict(m.get("parameters") or {})))
        return cls(**{**d, "models": models, "parameters": dict(d.get("parameters") or {})})


def resolve_checkpoint(ref: str) -> Path:
    """A model reference: an embedded model name (``smollm2_135m``) or a local checkpoint dir/file."""
    from fusionlab.models.embedded import EMBEDDED_MODELS, embedded_checkpoint

    if ref in EMBEDDED_MODELS:
        return embedded_checkpoint(ref)
    p = Path(ref).expanduser()
    if not p.exists():
        raise FusionlabError(
            f"Model {ref!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor an existing local "
            "checkpoint dir; merging reads local safetensors checkpoints."
        )
    return p


@dataclass
class _Input:
    label: str
    reader: CheckpointReader
    parameters: dict[str, Any]


def _check_architectures(inputs: list[_Input]) -> None:
    ref = inputs[0]
    for inp in inputs[1:]:
        for key in ("model_type", "architectures"):
            a, b = ref.reader.config.get(key), inp.reader.config.get(key)
            if a is not None and b is not None and a != b:
                raise FusionlabError(
                    f"Architecture mismatch: {ref.label} has {key}={a!r} but {inp.label} has {key}={b!r}; "
                    "merging needs models of the same architecture."
                )


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator per tensor, so random methods give the same result in any order and on resume."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


def plan(cfg: MergeConfig) -> dict[str, Any]:
    """Validate a merge completely and return what :func:`merge` needs (no tensor is read)."""
    method: Method = get_method(cfg.method)
    P.check_names(method, cfg.parameters, "merge.parameters")
    for m in cfg.models:
        P.check_names(method, m.parameters, f"the parameters of model {m.model!r}")
    if method.base == "required" and not cfg.base:
        raise FusionlabError(f"Merge method {method.name!r} needs a base model; set merge.base.")

    models = list(cfg.models)
    base_params: dict[str, Any] = {}
    if cfg.base:
        for m in models:
            if m.model == cfg.base:
                base_params = m.parameters
        models = [m for m in models if m.model != cfg.base]
    base = _Input(f"base model {cfg.base!r}", CheckpointReader(resolve_checkpoint(cfg.base), f"base model {cfg.base!r}"),
                  base_params) if cfg.base else None
    others = [_Input(f"model {m.model!r}", CheckpointReader(resolve_checkpoint(m.model), f"model {m.model!r}"), m.parameters)
              for m in models]
    if method.base == "input" and base is not None:
        others.append(base)  # linear: the base is one more weighted input (as in mergekit)
        base = None
    n_min = method.min_models + (1 if method.base == "input" else 0)
    if len(others) < n_min or (method.max_models is not None and len(others) > method.max_models):
        want = f"at least {n_min}" if method.max_models is None else f"exactly {method.max_models}"
        raise FusionlabError(f"Merge method {method.name!r} takes {want} model(s) besides the base; got {len(others)}.")
    inputs = ([base] if base else []) + others
    _check_architectures(inputs)
    ref = inputs[0]
    num_layers = ref.reader.config.get("num_hidden_layers")

    tensors = []
    for name in ref.reader.names:
        for inp in inputs[1:]:
            stored = inp.reader.resolve_name(name)
            if stored is None:
                raise FusionlabError(f"Tensor {name!r} is in {ref.label} but missing from {inp.label}; "
                                     "the models do not have the same architecture.")
            a, b = ref.reader.shape[name], inp.reader.shape[stored]
            if a != b:
                raise FusionlabError(
                    f"Shape mismatch for tensor {name!r}: {ref.label} has {list(a)}, {inp.label} has {list(b)}"
                    + (" (different vocabulary sizes; merge models that share a tokenizer)" if "embed" in name or "lm_head" in name else "")
                    + "."
                )
        t = P.layer_t(name, num_layers)
        shared = P.resolve(method.shared, [cfg.parameters], name, t, f"method {method.name!r}")
        per_model = [P.resolve(method.per_model, [o.parameters, cfg.parameters], name, t, o.label) for o in others]
        tensors.append((name, shared, per_model))

    src = cfg.tokenizer_source
    if src in (None, "base"):
        tok_dir = ref.reader.dir
    else:
        tok_dir = resolve_checkpoint(src)
        tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
    return {"method": method, "base": base, "others": others, "reference": ref, "tensors": tensors, "tokenizer_dir": tok_dir}


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """glibc only: while merging, keep freed blocks in the heap for the next tensor.

    By default glibc returns every large block (each tensor-sized buffer) to the OS when it is
    freed, and the next tensor's buffers are fresh pages the kernel must fault in and zero: about
    a third of a simple merge's time on a VM. Inside this block large allocations come from the
    heap and stay there; afterwards the defaults are set back (as fixed, not adaptive, thresholds)
    and the retained memory is trimmed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
    except OSError:
        libc = None
    if libc is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)


def merge(cfg: MergeConfig, planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run a merge (``planned``: what :func:`plan` returned for ``cfg``, if the caller validated it
    already); returns a flat summary (tensor count, bytes, seconds)."""
    with reuse_freed_memory():
        return _merge(cfg, planned)


def _merge(cfg: MergeConfig, planned: dict[str, Any] | None) -> dict[str, Any]:
    start = time.perf_counter()
    p = planned if planned is not None else plan(cfg)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusionlabError(f"merge.device={cfg.device!r} but no CUDA GPU is visible; use merge.device=cpu.")
    ref: _Input = p["reference"]
    if cfg.dtype == "auto":
        stored = [d for n, d in ref.reader.dtype.items() if d in ("F32", "BF16", "F16", "F64")]
        out_dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}[
            stored[0] if stored else "F32"]
    else:
        out_dtype = parse_dtype(cfg.dtype)
    method: Method = p["method"]
    base: _Input | None = p["base"]
    others: list[_Input] = p["others"]
    from tqdm.auto import tqdm

    bar = tqdm(p["tensors"], desc=f"merge ({method.name})", unit="tensor",
               disable=not cfg.progress or not sys.stderr.isatty())
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        entries = []
        for name, _, _ in p["tensors"]:
            stored = ref.reader.resolve_name(name)
            floating = ST_DTYPES[ref.reader.dtype[stored]].is_floating_point
            entries.append((name, ref.reader.shape[stored], out_dtype if floating else ST_DTYPES[ref.reader.dtype[stored]]))
        writer = StreamingShardWriter(tmp, entries, parse_size(cfg.shard_size),
                                      metadata={"fusionlab_merge_method": method.name})
        inputs = ([base] if base else []) + others

        def load(name: str) -> list[torch.Tensor]:
            """Read and check one tensor of every input (runs in the reader thread, one tensor ahead)."""
            ts = [inp.reader.get(name, device) for inp in inputs]
            for inp, t in zip(inputs, ts):
                if not is_finite(t):
                    raise FusionlabError(f"Tensor {name!r} of {inp.label} contains NaN or inf; fix that checkpoint first.")
            return ts

        floats = [name for (name, _, _), (_, _, dt) in zip(p["tensors"], entries) if dt.is_floating_point]
        ahead = iter(floats)
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionlab-reader")
        pending = reader.submit(load, next(ahead)) if floats else None
        try:
            for (name, shared, per_model), (_, _, dt) in zip(bar, entries):
                if not dt.is_floating_point:
                    writer.write(name, ref.reader.get(name, dtype=None))  # integer buffers: copy from the reference
                    continue
                ts = pending.result()
                following = next(ahead, None)
                pending = reader.submit(load, following) if following is not None else None
                gen = tensor_generator(cfg.seed, name, device) if method.random else None
                out = apply_method(method, ts[0] if base else None, ts[1:] if base else ts, shared, per_model, gen)
                if not is_finite(out):
                    raise FusionlabError(
                        f"The {method.name!r} merge produced NaN or inf in tensor {name!r} (parameters {shared}, "
                        f"{per_model}); check the weights (e.g. a zero weight sum with normalize=true)."
                    )
                writer.write(name, out.to(out_dtype))
                del ts, out
                for inp in inputs:
                    inp.reader.release(name)  # the pages stay in the page cache, not in this process
            writer.finish()
        finally:
            if pending is not None:
                pending.cancel()
            reader.shutdown(wait=True)
            writer.close()
            for inp in inputs:
                inp.reader.close()
        dtype_name = str(out_dtype).removeprefix("torch.")
        copy_aux_files(p["tokenizer_dir"], tmp, {"dtype": dtype_name})
        record = asdict(cfg) | {"inputs": [i.label for i in inputs]}
        (tmp / "fusionlab_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"merge_tensors": len(p["tensors"]), "merge_bytes": writer.total_bytes,
            "merge_seconds": round(time.perf_counter() - start, 3), "merge_output": str(cfg.output)}
