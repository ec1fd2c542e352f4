"""Typed settings of the distill and fusechat_merge jobs: every value checked in ``__post_init__``, once.

They type the composed ``distill:`` and ``fusechat_merge:`` nodes (:class:`fusionlab.schema.RootConfig`),
so an unknown key or a value of the wrong type fails while Hydra composes and a bad value (λ outside
[0, 1], an unknown fusion mode, a missing data file) when the config is built, before any model loads.
Each default is stated here; ``conf/distill/default.yaml`` states only what differs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusionlab.align.mapping import MappingConfig
from fusionlab.distill.conversations import SHIPPED_CONVERSATIONS, find_conversations, load_conversations
from fusionlab.distill.evaluation import EvalConfig
from fusionlab.distill.loss import check_loss_options
from fusionlab.errors import FusionlabError
from fusionlab.io import check_lightning_checkpoint
from fusionlab.distill.implicit import FUSION_KINDS, ImplicitConfig
from fusionlab.merge.derive import DeriveSpec, PerplexityEval
from fusionlab.models import ModelSpec

NO_RESUME = ("false", "none", "null", "")
# config.json keys that fusechat_merge targets must share: weights of one shape are what a merge adds up
ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads")
BASELINES = (None, "clm")
AUTO_RESUME = ("auto", "last", "true")


def _at_least(where: str, value: int | None, low: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or value < low:
        raise FusionlabError(f"{where}={value} must be >= {low}{' (or null)' if optional else ''}.")


def _weights(spec: ModelSpec) -> tuple:
    """What decides a model's weights and tokenizer (its name, device, dtype and prompt settings do not)."""
    path = spec.path
    if path and Path(path).expanduser().exists():
        path = str(Path(path).expanduser().resolve())
    random = spec.source == "random"
    return (spec.source, path, spec.tokenizer, json.dumps(spec.config, sort_keys=True, default=str) if random else None,
            spec.seed if random else None)


@dataclass
class DataConfig:
    path: str = SHIPPED_CONVERSATIONS  # a jsonl of conversations; relative: to the cwd, else to the fusionlab checkout
    heldout: int = 64  # conversations never trained on, scored at the end of every fit (seeded draw of the file)
    heldout_seed: int = 0  # the draw of the held-out conversations (independent of the training seed)
    dev_size: int = 0  # conversations drawn after the held-out ones as a dev slice: never trained on either
    dev: bool = False  # score the dev slice instead of the held-out set (to choose settings; needs dev_size > 0)
    start: int = 0  # training conversations [start, start + limit) (after the held-out ones are removed)
    limit: int | None = None  # N training conversations
    max_length: int = 512  # pivot tokens per sample (the text is cut, so every model sees the same characters)
    val_size: int = 0  # first N fused samples held out for val/loss

    def __post_init__(self) -> None:
        find_conversations(self.path)
        _at_least("distill.data.heldout", self.heldout, 1)
        _at_least("distill.data.dev_size", self.dev_size, 1 if self.dev else 0)
        _at_least("distill.data.start", self.start, 0)
        _at_least("distill.data.limit", self.limit, 1, optional=True)
        _at_least("distill.data.max_length", self.max_length, 2)
        _at_least("distill.data.val_size", self.val_size, 0)
        n = len(load_conversations(self.path))  # every line checked now (ms per thousand), not after models load
        if n - self.heldout - self.dev_size <= self.start:
            raise FusionlabError(f"distill.data.heldout={self.heldout}, dev_size={self.dev_size} and start="
                                 f"{self.start} leave no training conversation of the {n} in {self.path}; lower "
                                 "them or use a bigger file.")

    def train_slice(self, conversations: list) -> list:
        """The training conversations this config selects (``start``, ``limit``) of those left after the split."""
        return conversations[self.start:self.start + self.limit if self.limit else None]


@dataclass
class DistillConfig:
    # The model trained: a ModelSpec, ``${model}`` in conf (typed Any only because OmegaConf cannot type-check an
    # interpolation to another typed node while Hydra merges; __post_init__ checks it).
    pivot: Any = None
    sources: dict[str, ModelSpec] = field(default_factory=dict)  # name -> source model (/model@distill.sources.<name>)
    data: DataConfig = field(default_factory=DataConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)  # token + vocabulary alignment (distill/mapping=)
    topk: int = 10  # logits kept per token and model
    shard_size: int = 64  # samples per representation shard (the unit of resume)
    extract_batch_size: int = 1
    source_add_bos: bool = True  # prepend the source's BOS (base models expect it)
    cache_dir: str | None = None  # default: $FUSIONLAB_CACHE/distill/<hash of models + data + settings>
    lam: float = 0.9  # L = lam·CLM + (1 − lam)·fusion
    temperature: float = 1.0  # target = softmax(topk_logits / temperature)
    loss_type: str = "ce"  # ce | kl
    fusion_mode: str = "min_ce"  # min_ce (FuseChat pairwise / FuseLLM MinCE) | avg_ce | pivot
    pairwise_source: str | None = None  # FuseChat pairwise with several sources: candidates = pivot + this one
    batch_size: int = 2
    num_workers: int = 0
    # peft LoraConfig kwargs, e.g. {r: 8, lora_alpha: 16, target_modules: [q_proj]}; empty (or null): full fine-tune.
    # An empty dict, not None, by default: OmegaConf cannot merge a {...} override into a None node.
    lora: dict[str, Any] | None = field(default_factory=dict)
    gradient_checkpointing: bool = False
    resume: str | None = "auto"  # auto: <output_dir>/checkpoints/last.ckpt if present | false | a .ckpt path
    export_model: bool = True  # save_pretrained the trained pivot to <output_dir>/model
    baseline: str | None = None  # clm: also train a CLM-only twin (same data, steps, seed, optimizer; lam=1)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out scoring of pivot, fused model and baseline
    mode: str = "explicit"  # explicit: distil the sources' distributions | implicit: FuseChat-3.0 (sample, SFT, DPO)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)  # settings of mode=implicit
    derive: dict[str, DeriveSpec] = field(default_factory=dict)  # name -> fine-tune of the pivot; a source path derived:<name>

    def __post_init__(self) -> None:
        if isinstance(self.pivot, dict):
            self.pivot = ModelSpec(**self.pivot)
        if not isinstance(self.pivot, ModelSpec):
            raise FusionlabError(f"distill.pivot={self.pivot!r} is not a model config; leave it at ${{model}} (the "
                                 "`model` config: model=<name>) or give a model spec.")
        if not self.sources:
            raise FusionlabError("distill.sources is empty; add at least one source model, e.g. "
                                 "'+model@distill.sources.gemma3_270m=gemma3_270m'.")
        if self.mode not in FUSION_KINDS:
            raise FusionlabError(f"Unknown distill.mode {self.mode!r}; use one of {list(FUSION_KINDS)}.")
        for name, spec in self.sources.items():  # a derived source must be defined here
            ref = (spec.path or "").removeprefix("derived:")
            if spec.path and spec.path.startswith("derived:") and ref not in self.derive:
                raise FusionlabError(f"distill.sources.{name}.path={spec.path!r} names no distill.derive entry "
                                     f"(defined: {sorted(self.derive)}).")
        seen = {"the pivot (distill.pivot, the `model` config)": _weights(self.pivot)}
        for name, spec in self.sources.items():  # a model fused with itself only costs its extraction
            same = next((other for other, weights in seen.items() if weights == _weights(spec)), None)
            if same is not None:
                raise FusionlabError(f"distill.sources.{name} ({spec.source} {spec.path or spec.tokenizer!r}"
                                     f"{f', seed {spec.seed}' if spec.source == 'random' else ''}) is the same model as "
                                     f"{same}: its distributions add nothing; drop it or give another model (a random "
                                     "model: another seed or config).")
            seen[f"distill.sources.{name}"] = _weights(spec)
        scorer = self.implicit.scorer_model
        if self.mode == "implicit" and scorer is not None and scorer not in ("pivot", *self.sources):
            raise FusionlabError(f"distill.implicit.scorer_model={scorer!r} is not one of {['pivot', *self.sources]} "
                                 "(the models that answer the prompts); name one, or null for the first source.")
        if self.pairwise_source is not None and self.pairwise_source not in self.sources:
            raise FusionlabError(f"distill.pairwise_source={self.pairwise_source!r} is not one of the sources "
                                 f"{sorted(self.sources)}.")
        check_loss_options(self.lam, self.temperature, self.loss_type, self.fusion_mode)
        if self.baseline not in BASELINES:
            raise FusionlabError(f"distill.baseline={self.baseline!r} is not a baseline; use one of {list(BASELINES)} "
                                 "(clm: a CLM-only twin trained on the same data, steps, seed and optimizer).")
        for key in ("topk", "shard_size", "extract_batch_size", "batch_size"):
            _at_least(f"distill.{key}", getattr(self, key), 1)
        _at_least("distill.num_workers", self.num_workers, 0)
        self.resume_checkpoint(Path("."))  # a resume path that does not exist fails now, not after extraction

    def resume_checkpoint(self, output_dir: Path) -> str | None:
        """The checkpoint a fit in ``output_dir`` resumes from (``resume``: auto | false | a path), or None."""
        value = "false" if self.resume is None else str(self.resume).strip()
        if value.lower() in NO_RESUME:
            return None
        if value.lower() in AUTO_RESUME:
            last = Path(output_dir) / "checkpoints" / "last.ckpt"
            if not last.exists():
                return None
            # a last.ckpt truncated by a kill or a full disk: say so now, not as torch's zip error mid-fit
            check_lightning_checkpoint(last, "distill.resume", f"auto ({last})")
            return str(last)
        path = Path(value).expanduser()
        if not path.exists():
            raise FusionlabError(f"distill.resume={value!r} does not exist; give a .ckpt path, auto or false.")
        check_lightning_checkpoint(path, "distill.resume", value)
        return str(path)


@dataclass
class PairwiseTarget:
    """One FuseChat pairwise fusion target: the distill pipeline on some rows, with some settings changed."""

    rows: list[int] | None = None  # [start, stop] of the training conversations (after the held-out split; null: all)
    distill: dict[str, Any] = field(default_factory=dict)  # distill settings of this target, e.g. {pairwise_source: x}

    def __post_init__(self) -> None:
        if self.rows is not None and not (1 <= len(self.rows) <= 2 and all(r >= 0 for r in self.rows)):
            raise FusionlabError(f"fusechat_merge.pairwise.*.rows={list(self.rows)} must be [start, stop] "
                                 "(numbers >= 0 of the training conversations) or null.")


@dataclass
class FuseChatMergeConfig:
    targets: list[str] | None = None  # HF dirs of distilled pivots; null = make them from `pairwise`
    pairwise: dict[str, PairwiseTarget] = field(default_factory=dict)  # name -> target made by the distill pipeline
    eval: PerplexityEval | None = None  # perplexity of pivot, targets and merge (as the merge job's eval)

    def __post_init__(self) -> None:
        if not self.targets and not self.pairwise:
            raise FusionlabError("fusechat_merge needs targets: [dir, ...] (distilled pivots) or pairwise: "
                                 "{name: {rows, distill}} entries that the distill pipeline makes them from.")
        for t in self.targets or []:
            if not (Path(t).expanduser() / "config.json").is_file():
                raise FusionlabError(f"fusechat_merge.targets entry {t!r} is not an HF checkpoint dir (no "
                                     "config.json); give the distill run's <run dir>/model.")
        self.named_targets()  # duplicates and architectures, before the pivot is written or a merge planned

    def named_targets(self) -> dict[str, str]:
        """``targets`` by name (a ``<run>/model`` dir is named after ``<run>``; a clash gets ``_2``, ``_3``…),
        refusing the same dir twice and targets of different architectures (a merge needs one shape)."""
        from fusionlab.io import read_json_object

        named: dict[str, str] = {}
        shapes: dict[str, tuple] = {}
        for t in self.targets or []:
            path = Path(t).expanduser()
            if any(Path(d).expanduser().resolve() == path.resolve() for d in named.values()):
                raise FusionlabError(f"fusechat_merge.targets lists {t!r} twice: a target merged twice only weighs it "
                                     "double; list each distilled pivot once.")
            base = name = path.parent.name if path.name == "model" else path.name
            suffix = 1
            # /a/run/model and /b/run/model are merged under two names; pivot and merged name the job's other rows
            while name in named or name in ("pivot", "merged"):
                suffix += 1
                name = f"{base}_{suffix}"
            cfg = read_json_object(path / "config.json", "target config")
            shapes[name] = tuple(cfg.get(k) for k in ARCHITECTURE_KEYS)
            named[name] = t
        if len(set(shapes.values())) > 1:
            differ = [i for i, k in enumerate(ARCHITECTURE_KEYS) if len({v[i] for v in shapes.values()}) > 1]
            listed = "; ".join(f"{named[n]!r}: " + ", ".join(f"{ARCHITECTURE_KEYS[i]}={v[i]}" for i in differ)
                               for n, v in shapes.items())
            raise FusionlabError(f"fusechat_merge.targets have different architectures ({listed}); they must all be "
                                 "distilled from the same pivot (the `model` config) to be merged.")
        return named
