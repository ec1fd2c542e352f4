"""Derived checkpoints for the merge experiments, and the shipped texts they train and score on.

Only one checkpoint of each architecture ships with fusionlab (SmolLM2-135M-Instruct), so the
merge experiments make their own family from it:

- ``derive: {name: DeriveSpec}`` (:func:`derive_models`): a few AdamW steps of plain causal-LM
  training of the base on shipped texts (a real, short fine-tune; ~10-40 s on 2 CPU cores for
  SmolLM2-135M), cached under ``$FUSIONLAB_CACHE/merge_fixtures/<kind>-<key>`` where the key
  hashes every input; configs name it ``derived:<name>`` (resolved by
  :func:`fusionlab.models.resolve.resolve_checkpoint` with the map this returns);
- ``eval: PerplexityEval``: perplexity of models on held-out rows of the same texts;
- :func:`perturb`: base + Gaussian noise scaled per tensor (a documented stand-in for fine-tunes,
  used by the benchmark where only the tensors' shapes and values matter).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_dir, intact_cache_entry, write_manifest
from fusionlab.models.resolve import DERIVED_PREFIX, resolve_checkpoint
from fusionlab.tasks.texts import TEXT_SETS, load_text_set

log = logging.getLogger(__name__)

FIXTURE_VERSION = "2"  # 2: texts from the data shipped inside the package
KINDS = tuple(TEXT_SETS)  # the named text sets of fusionlab.tasks.texts


@dataclass
class TextSet:
    """Rows ``[start, stop)`` of a shipped text set (``kind``), or of a user JSONL of that format (``data``)."""

    kind: str
    start: int = 0
    stop: int | None = None
    data: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FusionlabError(f"Unknown text kind {self.kind!r} in a derive/eval entry; use one of {list(KINDS)}.")
        if self.start < 0 or (self.stop is not None and self.stop <= self.start):
            raise FusionlabError(f"Text rows start={self.start}, stop={self.stop} (kind {self.kind!r}) select nothing; "
                                 "use 0 <= start < stop (stop null = to the end).")
        if self.data is not None and not Path(self.data).expanduser().is_file():
            raise FusionlabError(f"Text file data={self.data!r} (kind {self.kind!r}) does not exist; drop `data` to "
                                 "use the shipped set.")

    def load(self) -> list[str]:
        return load_text_set(self.kind, path=self.data, start=self.start, stop=self.stop)


@dataclass
class DeriveSpec(TextSet):
    """A short real fine-tune of the base on a text set (CPU-sized defaults), cached by all its inputs."""

    steps: int = 4
    lr: float = 1e-4
    batch_size: int = 2
    max_length: int = 64  # tokens per training text
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for key, low in (("steps", 1), ("batch_size", 1), ("max_length", 2)):
            if getattr(self, key) < low:
                raise FusionlabError(f"derive entry {key}={getattr(self, key)}: must be >= {low}.")
        if not self.lr > 0:
            raise FusionlabError(f"derive entry lr={self.lr}: the learning rate must be > 0.")

    def training(self) -> dict[str, Any]:
        """The settings :func:`finetune` takes (the texts aside)."""
        text_fields = {f.name for f in fields(TextSet)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in text_fields}


@dataclass
class PerplexityEval:
    """Perplexity of every input and the output on text sets → ``ppl/<set>/<model>``, ``ppl_mean/<model>``."""

    sets: dict[str, TextSet] = field(default_factory=dict)
    max_length: int = 64
    batch_size: int = 4

    def __post_init__(self) -> None:
        self.sets = {name: s if isinstance(s, TextSet) else TextSet(**s) for name, s in self.sets.items()}
        if self.max_length < 2 or self.batch_size < 1:
            raise FusionlabError(f"eval max_length={self.max_length}, batch_size={self.batch_size}: perplexity needs "
                                 "max_length >= 2 and batch_size >= 1.")

    def score(self, models: Mapping[str, str | Path], derived: Mapping[str, str | Path] | None = None) -> dict[str, float]:
        """The metrics for ``models`` (label → model reference: a dir, an embedded name, ``derived:<name>``)."""
        from fusionlab.metrics.perplexity import perplexity_table

        texts = {name: s.load() for name, s in self.sets.items()}
        dirs = {label: resolve_checkpoint(str(ref), derived) for label, ref in models.items()}
        return perplexity_table(dirs, texts, self.max_length, self.batch_size)


def label_of(ref: str) -> str:
    """A readable name for a model reference in metrics: ``derived:<name>`` → name, a path → its last part."""
    return ref.removeprefix(DERIVED_PREFIX) if ref.startswith(DERIVED_PREFIX) else Path(ref).name or ref


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([FIXTURE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:16]


def finetune(base_dir: str | Path, texts: list[str], out_dir: str | Path, *, steps: int, lr: float, batch_size: int,
             max_length: int, seed: int) -> Path:
    """A short real fine-tune (AdamW, causal LM on ``texts``); written atomically with the tokenizer and a manifest,
    so a damaged entry is trained again (the same seed: the same weights)."""
    from fusionlab.models import ModelSpec, load_model

    out_dir = Path(out_dir)
    if intact_cache_entry(out_dir, "fine-tune"):
        return out_dir
    torch.manual_seed(seed)
    # fusionlab's loader: an unloadable tokenizer or a NaN weight is named, not a transformers traceback
    model, tok = load_model(ModelSpec(name=f"the base of {out_dir.name}", source="hf", path=str(base_dir),
                                      dtype="float32", device="cpu"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    losses = []
    from tqdm.auto import tqdm

    bar = tqdm(range(steps), desc=f"fine-tune {out_dir.name}", unit="step", leave=False, disable=steps < 16)
    for _ in bar:
        idx = torch.randint(len(texts), (batch_size,), generator=g).tolist()
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(float(loss.detach()), 4))
        bar.set_postfix(loss=losses[-1])
    log.info("fine-tuned %s for %d steps: loss %s", base_dir, steps, losses)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "finetune.json").write_text(json.dumps({"base": str(base_dir), "steps": steps, "lr": lr,
                                                      "batch_size": batch_size, "max_length": max_length,
                                                      "seed": seed, "losses": losses}, indent=2))
        write_manifest(tmp)
    return out_dir


def cached_finetune(base_dir: str | Path, spec: DeriveSpec, cache_root: Path) -> Path:
    """:func:`finetune` of ``base_dir`` on ``spec``'s texts, cached by a hash of all inputs (texts included)."""
    texts = spec.load()
    kw = spec.training()
    key = _key(str(base_dir), spec.kind, hashlib.sha256("\x00".join(texts).encode()).hexdigest(), kw)
    return finetune(base_dir, texts, cache_root / "merge_fixtures" / f"{spec.kind}-{key}", **kw)


def derive_models(specs: Mapping[str, DeriveSpec], base: str | None,
                  used: Iterable[str | None] | None = None) -> dict[str, str]:
    """Run (or reuse from the cache) the fine-tunes of ``base`` named in ``specs``; returns name → dir,
    the ``derived`` map of :func:`fusionlab.models.resolve.resolve_checkpoint`. ``used``: the job's model
    references; a spec none of them names (``derived:<name>``) is not trained — an experiment's default
    fine-tune costs minutes a user who replaced that input never asked for."""
    from fusionlab.models.embedded import cache_dir

    if used is not None:
        wanted = {ref.removeprefix(DERIVED_PREFIX) for ref in used if ref and ref.startswith(DERIVED_PREFIX)}
        for name in sorted(set(specs) - wanted):
            log.info("derive entry %r is not used by any input: not trained", name)
        specs = {name: spec for name, spec in specs.items() if name in wanted}
    if not specs:
        return {}
    if not base or base.startswith(DERIVED_PREFIX):
        raise FusionlabError(f"derive: fine-tunes start from a real checkpoint, but the base model is {base!r}; "
                             "set the base (merge.base / chat_vector.base) to a checkpoint dir or embedded name.")
    base_dir = resolve_checkpoint(base)
    out = {}
    for name, spec in specs.items():
        log.info("Deriving %s from %s (%s)", name, base, spec)
        out[name] = str(cached_finetune(base_dir, spec, cache_dir()))
    return out


def perturb(base_dir: str | Path, out_dir: str | Path, scale: float = 0.01, seed: int = 0) -> Path:
    """base + N(0, (scale·std(tensor))²) per floating tensor, written as fp32; config and tokenizer copied."""
    from fusionlab.merge.io import ST_DTYPES, CheckpointReader, ShardWriter, copy_aux_files

    out_dir = Path(out_dir)
    if intact_cache_entry(out_dir, "perturbed checkpoint"):
        return out_dir
    r = CheckpointReader(base_dir)
    floating = {n: ST_DTYPES[r.dtype[n]].is_floating_point for n in r.names}
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(out_dir, overwrite=True) as tmp:
        w = ShardWriter(tmp, [(n, r.shape[n], torch.float32 if floating[n] else ST_DTYPES[r.dtype[n]]) for n in r.names])
        try:
            for name in r.names:
                t = r.get(name, dtype=torch.float32 if floating[name] else None)
                if floating[name]:
                    std = float(t.std()) if t.numel() > 1 else 1.0
                    t = t + torch.randn(t.shape, generator=g) * scale * (std or 1.0)
                w.write(name, t)
            w.finish()
        finally:
            w.close()
        copy_aux_files(r.dir, tmp)
        write_manifest(tmp)
    return out_dir
