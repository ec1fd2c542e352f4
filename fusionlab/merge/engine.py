"""The streaming merge engine: plan (validate everything), then merge tensor by tensor.

All checks that can fail — unknown method or parameter, missing required parameter, a bad
parameter value, missing tensor, shape or architecture mismatch, device — run in :func:`plan`,
from the checkpoints' headers, before anything is read or written. NaN/inf in an input or the
output stops the merge; the output appears only when the whole merge succeeded (temp dir renamed
into place).
"""
from __future__ import annotations

import json
import logging
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_dir
from fusionlab.merge import params as P
from fusionlab.merge.config import MergeConfig
from fusionlab.merge.fast.memory import reuse_freed_memory
from fusionlab.merge.io import ST_DTYPES, CheckpointReader, ShardWriter, copy_aux_files, is_finite, parse_size
from fusionlab.merge.registry import Method, get_method
from fusionlab.models.resolve import resolve_checkpoint, resolve_device, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class MergeInput:
    """One input checkpoint of a planned merge."""

    label: str  # "base model '...'" / "model '...'", for messages
    reader: CheckpointReader
    parameters: dict[str, Any]  # its own parameters (highest precedence)


@dataclass
class TensorPlan:
    """One output tensor: the method's values for it, and what it is written as."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype (integer buffers keep theirs and are copied from the reference)
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]  # one per entry of MergePlan.others


@dataclass
class MergePlan:
    """Everything :func:`merge` needs, checked: what :func:`plan` returns (no tensor was read)."""

    method: Method
    base: MergeInput | None  # None for a method whose base is one more input (linear)
    others: list[MergeInput]
    tensors: list[TensorPlan]
    device: torch.device
    tokenizer_dir: Path

    @property
    def inputs(self) -> list[MergeInput]:
        return ([self.base] if self.base else []) + self.others

    @property
    def reference(self) -> MergeInput:
        """Whose tensor names, integer buffers and (by default) config the output takes."""
        return self.inputs[0]


def _check_architectures(inputs: list[MergeInput]) -> None:
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


def plan(cfg: MergeConfig, derived: Mapping[str, str | Path] | None = None) -> MergePlan:
    """Validate a merge completely (``derived``: name → dir of its ``derived:<name>`` inputs); no tensor is read."""
    method = get_method(cfg.method)
    if not cfg.output:
        raise FusionlabError("merge.output must be set: the directory the merged checkpoint goes to.")
    if method.base == "required" and not cfg.base:
        raise FusionlabError(f"Merge method {method.name!r} needs a base model; set merge.base.")

    def open_input(ref: str, label: str, parameters: dict[str, Any]) -> MergeInput:
        return MergeInput(label, CheckpointReader(resolve_checkpoint(ref, derived), label), parameters)

    base_params = next((m.parameters for m in cfg.models if m.model == cfg.base), {}) if cfg.base else {}
    base = open_input(cfg.base, f"base model {cfg.base!r}", base_params) if cfg.base else None
    others = [open_input(m.model, f"model {m.model!r}", m.parameters) for m in cfg.models if m.model != cfg.base]
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
    out_dtype = ref.reader.float_dtype() if cfg.dtype == "auto" else torch_dtype(cfg.dtype, "merge.dtype")
    shared_params = [p for p in method.parameters if not p.per_model]
    model_params = [p for p in method.parameters if p.per_model]

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
        shared = P.resolve(shared_params, [cfg.parameters], name, t, f"method {method.name!r}")
        per_model = [P.resolve(model_params, [o.parameters, cfg.parameters], name, t, o.label) for o in others]
        stored_dtype = ST_DTYPES[ref.reader.dtype[name]]
        tensors.append(TensorPlan(name, ref.reader.shape[name], out_dtype if stored_dtype.is_floating_point else stored_dtype,
                                  shared, per_model))

    src = cfg.tokenizer_source
    if src in (None, "base"):
        tok_dir = ref.reader.dir
    else:
        tok_dir = resolve_checkpoint(src, derived)
        tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
    return MergePlan(method, base, others, tensors, resolve_device(cfg.device, "merge.device"), tok_dir)


def merge(cfg: MergeConfig, planned: MergePlan | None = None,
          derived: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Run a merge (``planned``: what :func:`plan` returned for ``cfg``, if the caller validated it
    already); returns a flat summary (tensor count, bytes, seconds)."""
    with reuse_freed_memory():
        return _merge(cfg, planned if planned is not None else plan(cfg, derived))


def _merge(cfg: MergeConfig, p: MergePlan) -> dict[str, Any]:
    start = time.perf_counter()
    method, ref, inputs, device = p.method, p.reference, p.inputs, p.device
    seed = cfg.seed or 0
    from tqdm.auto import tqdm

    bar = tqdm(p.tensors, desc=f"merge ({method.name})", unit="tensor",
               disable=not cfg.progress or not sys.stderr.isatty())
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        writer = ShardWriter(tmp, [(t.name, t.shape, t.dtype) for t in p.tensors], parse_size(cfg.shard_size),
                             metadata={"fusionlab_merge_method": method.name})

        def load(name: str) -> list[torch.Tensor]:
            """Read and check one tensor of every input (runs in the reader thread, one tensor ahead)."""
            ts = [inp.reader.get(name, device) for inp in inputs]
            for inp, t in zip(inputs, ts):
                if not is_finite(t):
                    raise FusionlabError(f"Tensor {name!r} of {inp.label} contains NaN or inf; fix that checkpoint first.")
            return ts

        ahead = iter([t.name for t in p.tensors if t.dtype.is_floating_point])
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionlab-reader")
        first = next(ahead, None)
        pending = reader.submit(load, first) if first is not None else None
        try:
            for tp in bar:
                if not tp.dtype.is_floating_point:
                    writer.write(tp.name, ref.reader.get(tp.name, dtype=None))  # integer buffers: copy from the reference
                    continue
                ts = pending.result()
                following = next(ahead, None)
                pending = reader.submit(load, following) if following is not None else None
                gen = tensor_generator(seed, tp.name, device) if method.random else None
                out = method.apply(ts[0] if p.base else None, ts[1:] if p.base else ts, tp.shared, tp.per_model, gen)
                if not is_finite(out):
                    raise FusionlabError(
                        f"The {method.name!r} merge produced NaN or inf in tensor {tp.name!r} (parameters {tp.shared}, "
                        f"{tp.per_model}); check the weights (e.g. a zero weight sum with normalize=true)."
                    )
                writer.write(tp.name, out.to(tp.dtype))
                del ts, out
                for inp in inputs:
                    inp.reader.release(tp.name)  # the pages stay in the page cache, not in this process
            writer.finish()
        finally:
            if pending is not None:
                pending.cancel()
            reader.shutdown(wait=True)
            writer.close()
            for inp in inputs:
                inp.reader.close()
        out_dtype = next((t.dtype for t in p.tensors if t.dtype.is_floating_point), ref.reader.float_dtype())
        copy_aux_files(p.tokenizer_dir, tmp, {"dtype": str(out_dtype).removeprefix("torch.")})
        record = asdict(cfg) | {"inputs": [i.label for i in inputs]}
        (tmp / "fusionlab_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"merge_tensors": len(p.tensors), "merge_bytes": writer.total_bytes,
            "merge_seconds": round(time.perf_counter() - start, 3), "merge_output": str(cfg.output)}
