"""The streaming merge engine: plan (validate everything), then merge tensor by tensor.

All checks that can fail — unknown method or parameter, missing required parameter, a bad
parameter value, missing tensor, shape, dtype or architecture mismatch, a layer range outside its
model, device — run in :func:`plan`, from the checkpoints' headers, before anything is read or
written; the problems of the whole config are reported together, in one error. A plan is a list of
output tensors, each with its inputs (checkpoint + stored name: whole models map a name to itself,
``slices:`` map renumbered layers to their source layers); code that must adjust tensors before
any is written (e.g. vocabulary rows) changes the plan between :func:`plan` and :func:`merge`. NaN/inf in an input or the
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
from fusionlab.io import atomic_dir, check_not_an_input
from fusionlab.merge import params as P
from fusionlab.merge.config import MergeConfig
from fusionlab.merge.fast.memory import reuse_freed_memory
from fusionlab.merge.io import (ST_DTYPES, CheckpointReader, ShardWriter, copy_aux_files, is_embedding,
                                is_input_embedding, parse_size)
from fusionlab.merge.registry import Method, get_method
from fusionlab.merge.tokenizer import plan_vocabulary, source_model, tokenizer_config
from fusionlab.models.loading import is_finite
from fusionlab.models.resolve import resolve_checkpoint, resolve_device, torch_dtype

log = logging.getLogger(__name__)


@dataclass
class MergeInput:
    """One input checkpoint of a planned merge."""

    label: str  # "base model '...'" / "model '...'", for messages
    reader: CheckpointReader


@dataclass
class Source:
    """Where one input of an output tensor comes from: an input checkpoint and its stored tensor name."""

    input: int  # index into MergePlan.inputs
    name: str  # the stored name (another layer's for a slice; the embedding for a tied lm_head)


@dataclass
class TensorPlan:
    """One output tensor: its inputs, the method's values for it, and what it is written as."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype (integer buffers keep theirs and are copied from the first source)
    compute_dtype: torch.dtype  # what the inputs are converted to before the method runs
    shared: dict[str, Any]
    per_model: list[dict[str, Any]]  # one per entry of ``sources``
    base: Source | None  # the base's tensor (None: no base, or the base is one more input)
    sources: list[Source]  # the method's ``tensors``, in order


@dataclass
class MergePlan:
    """Everything :func:`merge` needs, checked: what :func:`plan` returns (no tensor was read)."""

    method: Method
    inputs: list[MergeInput]  # every checkpoint read, each once; the reference (base, else first) first
    tensors: list[TensorPlan]
    device: torch.device
    tokenizer_dir: Path
    config_overrides: dict[str, Any]  # written into the output's config.json (num_hidden_layers of a slice merge)
    vocabulary: Any = None  # fusionlab.merge.tokenizer.Vocabulary of a merge across tokenizers (None: the reference's)

    @property
    def reference(self) -> MergeInput:
        """Whose config the output takes by default."""
        return self.inputs[0]


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator per tensor, so random methods give the same result in any order and on resume."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return g


@dataclass
class _Slice:
    """An output slice with its sources resolved to inputs: what the planner walks."""

    sources: list[tuple[int, int, Mapping[str, Any]]]  # (input index, first layer, own parameters), method order
    base: int | None  # input index of the base (None: none, or it is one more input)
    num_layers: int
    parameters: Mapping[str, Any]  # the slice's own values (mergekit's slice parameters)


class _Problems:
    """Every problem the plan finds, raised together as one error (mergekit #328): grouped by kind, and
    the tensors that share one problem listed after it (all of them)."""

    def __init__(self) -> None:
        self.by_kind: dict[str, dict[str, list[str]]] = {}

    def add(self, kind: str, problem: str, tensor: str | None = None) -> None:
        tensors = self.by_kind.setdefault(kind, {}).setdefault(problem, [])
        if tensor is not None:
            tensors.append(tensor)

    @staticmethod
    def _line(problem: str, tensors: list[str]) -> str:
        if not tensors:
            return problem
        return f"Tensor {tensors[0]!r} — {problem}" if len(tensors) == 1 else \
            f"{problem} — at {len(tensors)} tensors: {', '.join(map(repr, tensors))}"

    def raise_if_any(self) -> None:
        lines = {kind: [self._line(p, t) for p, t in problems.items()] for kind, problems in self.by_kind.items()}
        n = sum(len(v) for v in lines.values())
        if n == 0:
            return
        if n == 1:
            raise FusionlabError(next(iter(lines.values()))[0])
        parts = [f"{kind} ({len(ls)}):\n" + "\n".join(f"  - {line}" for line in ls) for kind, ls in lines.items()]
        raise FusionlabError(f"The merge has {n} problems (found from the checkpoints' headers; nothing was read or "
                             "written):\n" + "\n".join(parts))


def _layer_name(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer``."""
    m = P._LAYER.search(name)
    return name[:m.start(1)] + str(layer) + name[m.end(1):]


def _layer_of(name: str) -> int | None:
    m = P._LAYER.search(name)
    return int(m.group(1)) if m else None


def _num_layers(reader: CheckpointReader) -> int:
    n = reader.config.get("num_hidden_layers")
    if isinstance(n, int):
        return n
    return 1 + max((i for i in map(_layer_of, reader.names) if i is not None), default=-1)


def plan(cfg: MergeConfig, derived: Mapping[str, str | Path] | None = None) -> MergePlan:
    """Validate a merge completely (``derived``: name → dir of its ``derived:<name>`` inputs); no tensor is read.

    Every problem found in the headers (missing tensors, shapes, dtypes, parameters, layer ranges) is
    reported in one error that lists all of them."""
    method = get_method(cfg.method)
    if not cfg.output:
        raise FusionlabError("merge.output must be set: the directory the merged checkpoint goes to.")
    if not cfg.models and not cfg.slices:
        raise FusionlabError("The merge has no inputs: list merge.models (or merge.slices).")
    inputs: list[MergeInput] = []
    index: dict[str, int] = {}

    def open_input(ref: str) -> int:
        if ref not in index:
            label = f"base model {ref!r}" if ref == cfg.base else f"model {ref!r}"
            index[ref] = len(inputs)
            inputs.append(MergeInput(label, CheckpointReader(resolve_checkpoint(ref, derived), label)))
        return index[ref]

    if cfg.base:
        open_input(cfg.base)
    if cfg.slices:  # mergekit's slices: the sources as listed; the base must be one of them
        slices = [(sl.base or cfg.base, [(s.model, s.layer_range[0], s.parameters) for s in sl.sources],
                   sl.num_layers, sl.parameters, f"merge.slices[{i}]") for i, sl in enumerate(cfg.slices)]
    else:  # whole models = one slice over all layers; the base is added as one more source if not listed
        srcs = [(m.model, 0, m.parameters) for m in cfg.models]
        if cfg.base and cfg.base not in [m.model for m in cfg.models]:
            srcs.append((cfg.base, 0, {}))
        slices = [(cfg.base, srcs, None, {}, "merge.models")]
    resolved = []
    for base_ref, srcs, n, params, where in slices:
        ids = [(open_input(ref), first, own) for ref, first, own in srcs]
        if len({i for i, _, _ in ids}) != len(ids):
            raise FusionlabError(f"{where} lists the same model twice; list each model once.")
        base = index.get(base_ref) if base_ref else None
        if method.base == "input" or (base is not None and base not in [i for i, _, _ in ids]):
            if method.base != "input":
                raise FusionlabError(f"The base model {base_ref!r} of {where} is not one of its sources; "
                                     "add it to the slice's sources.")
            base = None
        elif method.base == "required" and base is None:
            raise FusionlabError(f"Merge method {method.name!r} needs a base model; set merge.base"
                                 + (" (or the slice's base)." if cfg.slices else "."))
        others = [s for s in ids if s[0] != base]
        n_min, n_max = method.min_models, method.max_models
        if len(others) < n_min or (n_max is not None and len(others) > n_max):
            want = (f"at least {n_min}" if n_max is None else f"exactly {n_max}" if n_max == n_min
                    else f"{n_min} to {n_max}")
            raise FusionlabError(f"Merge method {method.name!r} takes {want} model(s)"
                                 f"{' (the base counts as one)' if method.base == 'input' else ' besides the base'}; "
                                 f"got {len(others)} in {where}.")
        ordered = ([s for s in ids if s[0] == base] if base is not None else []) + others
        resolved.append(_Slice(ordered, base, n if n is not None else _num_layers(inputs[ordered[0][0]].reader),
                               params))
    _check_architectures(inputs)
    tc = tokenizer_config(cfg.tokenizer, cfg.tokenizer_source)
    vocabulary = plan_vocabulary(tc, inputs, derived)  # wraps the inputs' readers: embeddings in the output vocabulary
    problems = _Problems()
    for sl, (_, _, _, _, where) in zip(resolved, slices):
        for i, first, _ in sl.sources:
            have = _num_layers(inputs[i].reader)
            if first + sl.num_layers > have:
                problems.add("layer ranges outside the model",
                             f"{where}: layer_range [{first}, {first + sl.num_layers}] of {inputs[i].label} is outside "
                             f"its {have} layers (0 .. {have - 1}; the stop is exclusive)")
    problems.raise_if_any()  # the tensor checks below assume the layer ranges exist

    ref = inputs[resolved[0].sources[0][0]]
    out_dtype = ref.reader.float_dtype() if cfg.dtype == "auto" else torch_dtype(cfg.dtype, "merge.dtype")
    compute = None if cfg.compute_dtype == "auto" else torch_dtype(cfg.compute_dtype, "merge.compute_dtype")
    tensors: list[TensorPlan] = []

    def add(out_name: str, sl: _Slice, layer: int | None, t: float) -> None:
        """Plan output tensor ``out_name`` from slice ``sl`` (its relative ``layer``; None outside the layers)."""
        found = []
        for i, first, _ in sl.sources:
            name = out_name if layer is None else _layer_name(out_name, first + layer)
            stored = inputs[i].reader.resolve_name(name)
            if stored is None:
                via = f" (as {name!r})" if name != out_name else ""
                problems.add("missing tensors", f"missing from {inputs[i].label}{via}; the models do not have the "
                             "same architecture", out_name)
                return
            found.append(Source(i, stored))
        lead = inputs[found[0].input].reader
        shape, stored_dtype = lead.shape[found[0].name], ST_DTYPES[lead.dtype[found[0].name]]
        for src in found[1:]:
            r = inputs[src.input].reader
            if r.shape[src.name] != shape:
                kind = "vocabulary mismatches" if is_embedding(out_name) else "shape mismatches"
                problems.add(kind, f"Shape mismatch for tensor {out_name!r}: {inputs[found[0].input].label} has "
                             f"{list(shape)}, {inputs[src.input].label} has {list(r.shape[src.name])}"
                             + (" (different vocabulary sizes: set tokenizer_source)" if is_embedding(out_name) else ""))
            elif ST_DTYPES[r.dtype[src.name]].is_floating_point != stored_dtype.is_floating_point:
                problems.add("dtype mismatches", f"{lead.dtype[found[0].name]} in {inputs[found[0].input].label} but "
                             f"{r.dtype[src.name]} in {inputs[src.input].label}", out_name)
        others = [(s, own) for s, (i, _, own) in zip(found, sl.sources) if i != sl.base]
        try:
            shared = P.resolve(shared_params, [sl.parameters, cfg.parameters], out_name, t, f"method {method.name!r}")
            per_model = [P.resolve(model_params, [own, sl.parameters, cfg.parameters], out_name, t,
                                   inputs[s.input].label) for s, own in others]
        except FusionlabError as e:  # the same problem at many tensors: listed once, with the tensors
            problems.add("parameter problems", str(e).replace(f" at tensor {out_name!r}", "").rstrip("."), out_name)
            return
        if method.weight_sum and shared.get(method.weight_sum) and all("weight" in pm for pm in per_model) \
                and abs(sum(float(pm["weight"]) for pm in per_model)) < 1e-8:
            problems.add("parameter problems", f"the weights sum to 0 and {method.name} divides by their sum "
                         f"({method.weight_sum}=true): every output value would be NaN or inf; give weights with a "
                         f"non-zero sum or set {method.weight_sum}=false", out_name)
            return
        if compute is not None:
            work = compute
        else:  # mergekit: the promoted dtype of the inputs
            work = stored_dtype
            for s in found[1:]:
                work = torch.promote_types(work, ST_DTYPES[inputs[s.input].reader.dtype[s.name]])
        tensors.append(TensorPlan(out_name, shape, out_dtype if stored_dtype.is_floating_point else stored_dtype,
                                  work if stored_dtype.is_floating_point else stored_dtype, shared, per_model,
                                  found[0] if sl.base is not None else None, [s for s, _ in others]))

    shared_params = [p for p in method.parameters if not p.per_model]
    model_params = [p for p in method.parameters if p.per_model]
    first_names = ref.reader.names
    if not cfg.slices:  # whole models: the reference's tensors in its order; gradients over its layers
        sl = resolved[0]
        for name in first_names:
            layer = _layer_of(name)
            add(name, sl, None, P.layer_t(name, sl.num_layers) if layer is not None else 0.0)
        config_overrides: dict[str, Any] = {}
    else:  # mergekit's slices: embeddings from the first slice, layers renumbered, the rest from the last slice
        last = inputs[resolved[-1].sources[0][0]].reader
        for name in first_names:
            if _layer_of(name) is None and is_input_embedding(name):
                add(name, resolved[0], None, 0.0)
        out_layer = 0
        for sl in resolved:
            lead = inputs[sl.sources[0][0]].reader
            for k in range(sl.num_layers):
                t = k / (sl.num_layers - 1) if sl.num_layers > 1 else 1.0
                for name in lead.names:
                    if _layer_of(name) == sl.sources[0][1] + k:
                        add(_layer_name(name, out_layer), sl, k, t)
                out_layer += 1
        for name in last.names:
            if _layer_of(name) is None and not is_input_embedding(name):
                add(name, resolved[-1], None, 0.0)
        _check_stacking(tensors, ref.reader, problems)
        config_overrides = {"num_hidden_layers": out_layer}
        layer_types = [inputs[sl.sources[0][0]].reader.config.get("layer_types") for sl in resolved]
        if all(isinstance(lt, list) for lt in layer_types):
            config_overrides["layer_types"] = [lt[sl.sources[0][1] + k] for lt, sl in zip(layer_types, resolved)
                                               for k in range(sl.num_layers)]
    problems.raise_if_any()

    src = source_model(tc.source) if tc is not None else None
    if src is None or vocabulary is not None:
        tok_dir = ref.reader.dir
    else:
        tok_dir = resolve_checkpoint(src, derived)
        tok_dir = tok_dir if tok_dir.is_dir() else tok_dir.parent
    check_not_an_input(cfg.output, [*((i.label, i.reader.dir) for i in inputs), ("tokenizer source", tok_dir)],
                       key="merge.output")
    return MergePlan(method, inputs, tensors, resolve_device(cfg.device, "merge.device"), tok_dir, config_overrides,
                     vocabulary)


def _check_stacking(tensors: list[TensorPlan], first: CheckpointReader, problems: _Problems) -> None:
    """Slices from different models must stack: each layer tensor has the shape of its counterpart in
    output layer 0, and the tensors after the layers (from the last slice) those of the first slice's model."""
    seen: dict[str, tuple[tuple[int, ...], str]] = {}
    for tp in tensors:
        layer = _layer_of(tp.name)
        if layer is None:
            want = first.shape.get(tp.name)
            if want is not None and want != tp.shape:
                problems.add("slices do not stack", f"shape {list(tp.shape)} from the last slice, but {list(want)} in "
                             f"the first slice's model", tp.name)
            continue
        key = _layer_name(tp.name, 0)
        if key not in seen:
            seen[key] = (tp.shape, tp.name)
        elif seen[key][0] != tp.shape:
            problems.add("slices do not stack", f"shape {list(tp.shape)}, but {seen[key][1]!r} has "
                         f"{list(seen[key][0])} (layers from models of different sizes)", tp.name)


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


def merge(cfg: MergeConfig, planned: MergePlan | None = None,
          derived: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Run a merge (``planned``: what :func:`plan` returned for ``cfg``, if the caller validated it
    already); returns a flat summary (tensor count, bytes, seconds)."""
    with reuse_freed_memory():
        return _merge(cfg, planned if planned is not None else plan(cfg, derived))


def _merge(cfg: MergeConfig, p: MergePlan) -> dict[str, Any]:
    start = time.perf_counter()
    method, inputs, device = p.method, p.inputs, p.device
    seed = cfg.seed or 0
    from tqdm.auto import tqdm

    bar = tqdm(p.tensors, desc=f"merge ({method.name})", unit="tensor",
               disable=not cfg.progress or not sys.stderr.isatty())
    with atomic_dir(cfg.output, overwrite=cfg.overwrite) as tmp:
        writer = ShardWriter(tmp, [(t.name, t.shape, t.dtype) for t in p.tensors], parse_size(cfg.shard_size),
                             metadata={"fusionlab_merge_method": method.name})

        def load(tp: TensorPlan) -> list[torch.Tensor]:
            """Read and check one output tensor's inputs, base first (runs in the reader thread, one tensor ahead)."""
            srcs = ([tp.base] if tp.base else []) + tp.sources
            return [inputs[s.input].reader.get(s.name, device, dtype=tp.compute_dtype) for s in srcs]  # finite

        def release(tp: TensorPlan) -> None:
            for s in ([tp.base] if tp.base else []) + tp.sources:
                inputs[s.input].reader.release(s.name)  # the pages stay in the page cache, not in this process

        ahead = iter([t for t in p.tensors if t.dtype.is_floating_point])
        reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionlab-reader")
        first = next(ahead, None)
        pending = reader.submit(load, first) if first is not None else None
        try:
            for tp in bar:
                if not tp.dtype.is_floating_point:  # integer buffers: copied from the first source
                    writer.write(tp.name, inputs[tp.sources[0].input].reader.get(tp.sources[0].name, dtype=None))
                    continue
                ts = pending.result()
                following = next(ahead, None)
                pending = reader.submit(load, following) if following is not None else None
                gen = tensor_generator(seed, tp.name, device) if method.random else None
                out = method.apply(ts[0] if tp.base else None, ts[1:] if tp.base else ts, tp.shared, tp.per_model, gen)
                if not is_finite(out):
                    raise FusionlabError(
                        f"The {method.name!r} merge produced NaN or inf in tensor {tp.name!r} (parameters {tp.shared}, "
                        f"{tp.per_model}); check the weights (e.g. a zero weight sum with normalize=true)."
                    )
                writer.write(tp.name, out.to(tp.dtype))
                del ts, out
                release(tp)
            writer.finish()
        finally:
            if pending is not None:
                pending.cancel()
            reader.shutdown(wait=True)
            writer.close()
            for inp in inputs:
                inp.reader.close()
        out_dtype = next((t.dtype for t in p.tensors if t.dtype.is_floating_point), p.reference.reader.float_dtype())
        copy_aux_files(p.tokenizer_dir, tmp, {**p.config_overrides, "dtype": str(out_dtype).removeprefix("torch.")})
        if p.vocabulary is not None:
            p.vocabulary.save(tmp)  # the output tokenizer; config.json's vocab_size and special ids
        record = asdict(cfg) | {"inputs": [i.label for i in inputs]}
        (tmp / "fusionlab_merge.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return {"merge_tensors": len(p.tensors), "merge_bytes": writer.total_bytes,
            "merge_seconds": round(time.perf_counter() - start, 3), "merge_output": str(cfg.output)}
