"""The ``ensemble:`` config section as a dataclass: unknown keys fail with their name."""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from fusionlab.errors import FusionlabError


@dataclass
class EnsembleConfig:
    aux: dict[str, dict[str, Any]] = field(default_factory=dict)
    topk: int = 320
    drop: int | None = 5
    combiner: str = "uniform"
    weights: list[float] | None = None
    do_sample: bool = False
    temperature: float = 1.0
    seed: int = 0
    sync: str = "auto"
    window: int = 4
    use_cache: bool = True
    batch_size: int = 8
    eval_members: bool = True
    cache_dir: str | None = None
    rebuild_alignment: bool = False
    threads: int | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EnsembleConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FusionlabError(f"Unknown ensemble option(s) {unknown}; valid options are {sorted(known)}.")
        cfg = cls(**d)
        if not cfg.aux:
            raise FusionlabError("ensemble.aux is empty: add at least one aux model, e.g. "
                                 "'+model@ensemble.aux.gemma3_270m=gemma3_270m'.")
        return cfg

    def decoder_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("topk", "drop", "combiner", "weights", "do_sample", "temperature",
                                              "seed", "sync", "window", "use_cache")}
