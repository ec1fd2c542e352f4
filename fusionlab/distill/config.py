"""Typed settings of the distill job; unknown keys fail with their name (a typo here wastes a GPU run)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from fusionlab.errors import FusionlabError


def _strict(cls, d: dict[str, Any], where: str):
    d = dict(d or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise FusionlabError(f"Unknown option(s) {unknown} in {where}; valid options are {sorted(known)}.")
    for f in fields(cls):
        sub = f.metadata.get("nested")
        if sub is not None and f.name in d and not is_dataclass(d[f.name]):
            d[f.name] = _strict(sub, d[f.name], f"{where}.{f.name}")
    return cls(**d)


@dataclass
class DataConfig:
    path: str = "???"
    limit: int | None = None  # first N conversations
    max_length: int = 512  # pivot tokens per sample (the text is cut, so every model sees the same characters)
    val_size: int = 0  # first N fused samples held out for val/loss


@dataclass
class AlignConfig:
    """Token + vocabulary alignment (the ``align_method`` group, fusechat_* files)."""

    family: str = "fusechat"
    method: str = "ms"  # em | mined | ms
    substring_weight: float = 0.1
    one_to_one: bool = True  # also use 1-1 DTW pairs whose spans end at different characters
    min_exact_rate: float = 0.2  # below this a source counts as not alignable


@dataclass
class DistillConfig:
    pivot: dict[str, Any] = field(default_factory=dict)  # a ModelSpec dict (conf/model/*)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> ModelSpec dict
    data: DataConfig = field(default_factory=DataConfig, metadata={"nested": DataConfig})
    topk: int = 10
    shard_size: int = 64
    extract_batch_size: int = 1
    source_add_bos: bool = True  # prepend the source's BOS (base models expect it)
    cache_dir: str | None = None  # default: $FUSIONLAB_CACHE/distill/<key>
    lam: float = 0.9  # weight of CLM; (1 - lam) on the fusion term
    temperature: float = 1.0
    loss_type: str = "ce"  # ce | kl
    fusion_mode: str = "min_ce"  # min_ce (FuseChat pairwise / FuseLLM MinCE) | avg_ce | pivot
    pairwise_source: str | None = None  # FuseChat: candidates = pivot + this one source
    batch_size: int = 2
    num_workers: int = 0
    lora: dict[str, Any] | None = None  # peft LoraConfig kwargs, e.g. {r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}
    gradient_checkpointing: bool = False
    resume: Any = "auto"  # auto: <output_dir>/checkpoints/last.ckpt if present | false | a .ckpt path
    export_model: bool = True  # save_pretrained the trained pivot to <output_dir>/model

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DistillConfig":
        c = _strict(cls, d, "distill")
        if not c.pivot:
            raise FusionlabError("distill.pivot is empty; set it to a model config (e.g. model=smollm2_135m).")
        if not c.sources:
            raise FusionlabError("distill.sources is empty; add at least one source model.")
        if c.pairwise_source is not None and c.pairwise_source not in c.sources:
            raise FusionlabError(f"distill.pairwise_source={c.pairwise_source!r} is not one of the sources {sorted(c.sources)}.")
        return c


def align_config(d: dict[str, Any] | None) -> AlignConfig:
    d = dict(d or {})
    if d.get("family", "fusechat") != "fusechat":
        raise FusionlabError(f"align_method {d.get('name', d)!r} is not a FuseChat method; the distill job needs "
                             "align_method=fusechat_ms, fusechat_mined or fusechat_em.")
    d.pop("name", None)
    return _strict(AlignConfig, d, "align_method")
