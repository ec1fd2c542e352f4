"""The typed ``merge:`` config: one merge, checked once when it is built.

:class:`MergeConfig` is the node ``merge:`` of the Hydra config (``conf/experiment/merge.yaml``,
``conf/merge_method/*.yaml``) and the object library callers build; its ``__post_init__`` checks every
value that can be checked without reading a checkpoint (method known, parameter names known to the
method's signature, dtype, device, shard size, ``derived:<name>`` references defined). What needs
the checkpoints' headers (required parameters per tensor, shapes, architectures) is checked by
:func:`fusionlab.merge.engine.plan`, still before any tensor is read.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionlab.errors import FusionlabError
from fusionlab.io import check_output_path
from fusionlab.merge.derive import DeriveSpec, PerplexityEval
from fusionlab.merge.io import parse_size
from fusionlab.merge.registry import get_method
from fusionlab.merge.tokenizer import TokenizerConfig, check_source, source_model, tokenizer_config
from fusionlab.models.resolve import DERIVED_PREFIX, check_device, torch_dtype


def build(cls: type, values: Any, where: str) -> Any:
    """``cls(**values)`` for a plain dict (an instance passes through); an unknown key names ``where``."""
    if isinstance(values, cls):
        return values
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise FusionlabError(f"Unknown option(s) {unknown} in {where}; valid options are {sorted(known)}.")
    return cls(**(values or {}))


@dataclass
class InputModel:
    """One model to merge and its own parameters (highest precedence)."""

    model: str  # a checkpoint dir or file, an embedded model name, or derived:<name>
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One model's layer range ``[start, stop)`` in an output slice (mergekit's ``slices[].sources[]``)."""

    model: str
    layer_range: list[int] = field(default_factory=list)  # [start, stop): layers start .. stop - 1
    parameters: dict[str, Any] = field(default_factory=dict)  # this source's own (highest precedence)

    def __post_init__(self) -> None:
        r = list(self.layer_range)
        if len(r) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in r) or not 0 <= r[0] < r[1]:
            raise FusionlabError(f"layer_range={self.layer_range!r} of slice source {self.model!r} must be [start, stop] "
                                 "with 0 <= start < stop (stop exclusive, as in mergekit).")
        self.layer_range = r


@dataclass
class OutputSlice:
    """A run of output layers merged from equally long layer ranges of its sources (a frankenmerge stacks
    several; with ``passthrough`` each slice has one source)."""

    sources: list[SliceSource] = field(default_factory=list)
    base: str | None = None  # this slice's base model (one of its sources), else merge.base
    parameters: dict[str, Any] = field(default_factory=dict)  # this slice's values (between sources' and global)

    def __post_init__(self) -> None:
        self.sources = [build(SliceSource, s, "a slice source") for s in self.sources]
        if not self.sources:
            raise FusionlabError("A merge slice has no sources; give each slice sources: [{model, layer_range}].")
        lengths = [s.layer_range[1] - s.layer_range[0] for s in self.sources]
        if len(set(lengths)) > 1:
            raise FusionlabError(f"The sources of a slice must span the same number of layers; got layer ranges "
                                 f"{[s.layer_range for s in self.sources]} ({lengths} layers).")

    @property
    def num_layers(self) -> int:
        return self.sources[0].layer_range[1] - self.sources[0].layer_range[0]


@dataclass
class MergeConfig:
    """One merge, as ``merge:`` in the Hydra config and mergekit's YAML write it (``merge_method`` → ``method``).

    ``derive`` and ``eval`` serve the merge experiments: inputs made by short fine-tunes
    (``derived:<name>``) and the text sets every input and the output are scored on."""

    method: str  # a registered merge method (conf/merge_method/<name>.yaml)
    models: list[InputModel] = field(default_factory=list)
    slices: list[OutputSlice] = field(default_factory=list)  # layer ranges to stack (instead of models)
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)  # global values (lowest precedence)
    output: str | None = None  # the merged checkpoint's dir; the merge job's default: <run dir>/merged
    dtype: str = "auto"  # output dtype; auto = the reference model's stored dtype
    compute_dtype: str = "float32"  # auto = the promoted stored dtype of each tensor's inputs (mergekit's default)
    device: str = "cpu"  # cpu | cuda | cuda:N | auto
    shard_size: str = "5GB"  # "5GB", "500MB" or a number of bytes
    tokenizer_source: str | None = None  # base | union | model:<ref> (fusionlab.merge.tokenizer); null: copy the base's
    tokenizer: TokenizerConfig | None = None  # mergekit's tokenizer: section (source, tokens, pad_to_multiple_of) + fill
    seed: int | None = None  # random methods (dare, della): a generator per tensor; null = the run's seed (else 0)
    overwrite: bool = False
    progress: bool = True
    mergekit_config: str | None = None  # a mergekit YAML to run instead of method/base/models/parameters
    derive: dict[str, DeriveSpec] = field(default_factory=dict)  # name -> fine-tune, referred to as derived:<name>
    eval: PerplexityEval | None = None  # perplexity of every input and the output

    def __post_init__(self) -> None:
        self.models = [InputModel(m) if isinstance(m, str) else build(InputModel, m, f"merge.models[{i}]")
                       for i, m in enumerate(self.models)]
        self.slices = [build(OutputSlice, s, f"merge.slices[{i}]") for i, s in enumerate(self.slices)]
        if self.slices and self.models:
            raise FusionlabError("Set either merge.models (whole models) or merge.slices (layer ranges), not both.")
        self.derive = {n: build(DeriveSpec, s, f"merge.derive.{n}") for n, s in self.derive.items()}
        self.eval = build(PerplexityEval, self.eval, "merge.eval") if self.eval is not None else None
        method = get_method(self.method)
        method.check_names(self.parameters, "merge.parameters")
        for m in self.models:
            method.check_names(m.parameters, f"the parameters of model {m.model!r}", one_model=True)
        for i, sl in enumerate(self.slices):
            method.check_names(sl.parameters, f"merge.slices[{i}].parameters")
            for src in sl.sources:
                method.check_names(src.parameters, f"merge.slices[{i}] source {src.model!r}", one_model=True)
        for key in ("dtype", "compute_dtype"):
            if getattr(self, key) != "auto" and not torch_dtype(getattr(self, key), f"merge.{key}").is_floating_point:
                raise FusionlabError(f"merge.{key}={getattr(self, key)!r} is not a floating-point dtype; use "
                                     "float32, bfloat16, float16 or auto.")
        check_device(self.device, "merge.device")
        parse_size(self.shard_size)
        if self.output is not None:  # an existing output is refused (or, with overwrite, must be ours) before any work
            check_output_path(self.output, self.overwrite, key="merge.output")
        self.tokenizer = build(TokenizerConfig, self.tokenizer, "merge.tokenizer") if self.tokenizer is not None else None
        check_source(self.tokenizer_source, "merge.tokenizer_source")
        tokenizer_config(self.tokenizer, self.tokenizer_source)  # not both
        for ref in self.model_refs:
            if ref and ref.startswith(DERIVED_PREFIX) and ref.removeprefix(DERIVED_PREFIX) not in self.derive:
                raise FusionlabError(f"Model {ref!r} is not defined under merge.derive (defined: {sorted(self.derive)}).")
        if self.mergekit_config and not Path(self.mergekit_config).expanduser().is_file():
            raise FusionlabError(f"merge.mergekit_config={self.mergekit_config!r} does not exist; give a mergekit YAML.")

    @property
    def model_refs(self) -> list[str | None]:
        """Every model reference the merge reads: base, tokenizer source, models, slice sources and bases."""
        return [self.base, source_model(self.tokenizer_source), *(m.model for m in self.models),
                *(s.model for sl in self.slices for s in sl.sources), *(sl.base for sl in self.slices)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "MergeConfig":
        """From a plain dict (library callers, mergekit YAML): an unknown key is an error naming it."""
        return build(cls, values, "merge")

    @property
    def reference(self) -> str | None:
        """The model the others are compared with and derived from: the base, else the first model."""
        first = self.models[0].model if self.models else self.slices[0].sources[0].model if self.slices else None
        return self.base or first

    def for_run(self, output: str | Path, seed: int | None) -> "MergeConfig":
        """This merge as a run executes it: ``output`` and ``seed`` where unset, a mergekit YAML translated
        (its method, models and parameters; this config's dtype, device ... where they differ from the defaults)."""
        run = dataclasses.replace(self, output=self.output or str(output),
                                  seed=self.seed if self.seed is not None else seed)
        if not run.mergekit_config:
            return run
        from fusionlab.merge.mergekit_yaml import load_mergekit_config

        keep = {"device", "shard_size", "dtype", "compute_dtype", "seed", "overwrite", "progress", "derive", "eval"}
        defaults = MergeConfig(method=self.method)
        overrides = {k: getattr(run, k) for k in keep if getattr(run, k) != getattr(defaults, k)}
        return load_mergekit_config(run.mergekit_config, run.output, **overrides)
