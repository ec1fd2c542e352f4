"""The ``ensemble:`` config node, typed: every option's default and value check, written once.

:class:`DecodingOptions` is what :class:`~fusionlab.ensemble.EvaDecoder` takes (also the
``eva_eval`` callback's ``decoder:``); :class:`EnsembleConfig` adds the ``ensemble`` job's own
options (aux models, batching, member runs, alignment cache). The checks run in
``__post_init__``, so a bad value fails when the config is built (``fusionlab.schema.validate``),
before any model loads. Combiners, candidate rules and gates are the names of their registries.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from fusionlab.ensemble.candidates import CANDIDATES
from fusionlab.ensemble.combine import COMBINERS, takes
from fusionlab.ensemble.gates import GATES
from fusionlab.errors import FusionlabError
from fusionlab.models.loading import ModelSpec

SYNC_MODES = ("auto", "text")
WEIGHT_SOURCES = ("dev_score",)  # ensemble.weights_from: where linear_sum weights come from besides `weights`


def _choice(key: str, value: str, registry) -> None:
    if value not in registry:
        raise FusionlabError(f"ensemble.{key}={value!r} is not one of {sorted(registry)}; "
                             f"set ensemble.{key} to one of them.")


@dataclass
class DecodingOptions:
    """How the EVA decoder picks each token (see docs/eva.md)."""

    topk: int = 320  # each model's distribution is truncated to its top-k tokens
    drop: int | None = 5  # drop filter n (keep a model iff its argmax is in another's top-n); None: off
    keep_main: bool = False  # the drop filter never drops the main model
    candidates: str = "own"  # own: each member's own top-k (EVA) | union: union top-k (UniTE)
    combiner: str = "uniform"  # uniform (EVA) | linear_sum | confidence
    weights: list[float] | None = None  # linear_sum: one weight per aux model, main gets 1 - sum; None: equal
    gate: str = "always"  # always (EVA) | confidence (main top-1 prob <= threshold) | disagree
    gate_threshold: float | None = None  # the gate's threshold in [0, 1]; None: the gate's own default
    do_sample: bool = False
    temperature: float = 1.0  # sampling only
    seed: int = 0
    sync: str = "auto"  # auto: aux models with the main's tokenizer get its tokens directly | text: re-tokenise
    window: int = 4  # aux tokens re-tokenised per step (rolled back if their segmentation changes)
    use_cache: bool = True  # False: recompute full contexts every step (for comparison only)
    parallel: bool = True  # run the members of a step concurrently, one thread each
    threads: int | None = None  # torch CPU threads per member; None: the cores divided among the members

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise FusionlabError(f"ensemble.topk={self.topk} must be >= 1 (the number of tokens each model keeps).")
        if self.drop is not None and self.drop < 1:
            raise FusionlabError(f"ensemble.drop={self.drop} must be >= 1 (the drop filter's top-n), or null "
                                 "to switch the filter off.")
        _choice("candidates", self.candidates, CANDIDATES)
        _choice("combiner", self.combiner, COMBINERS)
        _choice("gate", self.gate, GATES)
        _choice("sync", self.sync, SYNC_MODES)
        if self.weights is not None:
            if not takes(COMBINERS[self.combiner], "weights"):
                users = sorted(n for n, f in COMBINERS.items() if takes(f, "weights"))
                raise FusionlabError(f"ensemble.weights={self.weights} has no effect with ensemble.combiner="
                                     f"{self.combiner!r}; it applies to {users} (or set ensemble.weights=null).")
            if any(w < 0 for w in self.weights) or sum(self.weights) > 1 + 1e-6:
                raise FusionlabError(f"ensemble.weights={self.weights} must be >= 0 and sum to at most 1 "
                                     "(the main model gets 1 - their sum).")
        if self.gate_threshold is not None:
            if not takes(GATES[self.gate], "threshold"):
                users = sorted(n for n, f in GATES.items() if takes(f, "threshold"))
                raise FusionlabError(f"ensemble.gate_threshold={self.gate_threshold} has no effect with ensemble.gate="
                                     f"{self.gate!r}; it applies to {users} (or set ensemble.gate_threshold=null).")
            if not 0.0 <= self.gate_threshold <= 1.0:
                raise FusionlabError(f"ensemble.gate_threshold={self.gate_threshold} must be in [0, 1] (a probability).")
        if self.do_sample and self.temperature <= 0:
            raise FusionlabError(f"ensemble.temperature={self.temperature} must be > 0 when sampling.")
        if not self.do_sample and self.temperature != 1.0:
            raise FusionlabError(f"ensemble.temperature={self.temperature} has no effect with greedy decoding; "
                                 "set ensemble.do_sample=true to sample, or leave the temperature at 1.0.")
        if self.window < 1:
            raise FusionlabError(f"ensemble.window={self.window} must be >= 1 (aux tokens re-tokenised per step).")
        if self.threads is not None and self.threads < 1:
            raise FusionlabError(f"ensemble.threads={self.threads} must be >= 1, or null for the cores divided "
                                 "among the members.")

    def check_members(self, n_aux: int) -> None:
        """The checks that need the number of aux models."""
        if n_aux and self.weights is not None and len(self.weights) != n_aux:
            raise FusionlabError(f"ensemble.weights has {len(self.weights)} values for {n_aux} aux models: give one "
                                 "weight per aux model (the main model gets 1 - their sum).")

    def member_threads(self, n_models: int) -> int:
        """Torch threads per member: ``threads``, else the usable cores shared among the members that run at once."""
        if self.threads:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // (n_models if self.parallel else 1))

    def decoding(self) -> "DecodingOptions":
        """The decoding options alone (an EnsembleConfig without its job options)."""
        return DecodingOptions(**{f.name: getattr(self, f.name) for f in fields(DecodingOptions)})


@dataclass
class EnsembleConfig(DecodingOptions):
    """The ``ensemble`` job: main = the top-level ``model``, aux models here, decoding options above."""

    aux: dict[str, ModelSpec] = field(default_factory=dict)  # name -> model spec (conf/model/*.yaml fields)
    batch_size: int = 8
    eval_members: bool = True  # also run each member alone on the same examples (accuracy, step time)
    cache_dir: str | None = None  # alignment cache; None: $FUSIONLAB_CACHE/align
    rebuild_alignment: bool = False
    bootstrap_samples: int = 10000  # paired-bootstrap resamples for the ensemble − best member interval
    warmup: int = 8  # compatibility check: demonstration-free dev examples per member before ensembling; 0: off
    weights_from: str | None = None  # dev_score: linear_sum weights from each member's accuracy on dev examples
    dev_examples: int = 16  # dev examples (with the run's demonstrations) that weights_from=dev_score scores

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.warmup < 0:
            raise FusionlabError(f"ensemble.warmup={self.warmup} must be >= 0 (0 switches the compatibility "
                                 "check's warm-up off).")
        if self.weights_from is not None:
            if self.weights_from not in WEIGHT_SOURCES:
                raise FusionlabError(f"ensemble.weights_from={self.weights_from!r} is not one of "
                                     f"{list(WEIGHT_SOURCES)} (or null for ensemble.weights).")
            if self.combiner != "linear_sum" or self.weights is not None:
                raise FusionlabError(f"ensemble.weights_from={self.weights_from!r} sets the linear_sum weights: use "
                                     f"it with ensemble.combiner=linear_sum and ensemble.weights=null (got combiner="
                                     f"{self.combiner!r}, weights={self.weights}).")
            if self.dev_examples < 1:
                raise FusionlabError(f"ensemble.dev_examples={self.dev_examples} must be >= 1 to score the members.")
        if not self.aux:
            raise FusionlabError("ensemble.aux is empty: add at least one aux model, e.g. "
                                 "'+model@ensemble.aux.gemma3_270m=gemma3_270m'.")
        self.check_members(len(self.aux))
        if self.batch_size < 1:
            raise FusionlabError(f"ensemble.batch_size={self.batch_size} must be >= 1.")
        if self.bootstrap_samples < 100:
            raise FusionlabError(f"ensemble.bootstrap_samples={self.bootstrap_samples} must be >= 100 for a "
                                 "usable 95% interval.")
