"""Source distributions moved onto the pivot's tokens and vocabulary; the fused training set.

At pivot position i with a usable source position j (spans end at the same character, or a
1-1 DTW pair) the source's top-k ids at j are mapped into the pivot vocabulary (a vocab map
from :mod:`fusionlab.align.mapping`); unmapped ids and duplicates are dropped, keeping the
higher logit. Elsewhere the target is one-hot on the NEXT pivot token (FuseLLM used the
current token: an off-by-one), i.e. the fusion loss falls back to the CLM loss there.
Padding slots have id -1.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from fusionlab.align.mapping import build_vocab_map, count_coalignments
from fusionlab.align.token_align import TokenAlignment, align_tokens
from fusionlab.align.vocab import strip_marker
from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)


def dedupe_topk(ids: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blank (-1 / -inf) invalid ids and repeats within each row; rows are sorted by logit, first wins."""
    ids = ids.copy()
    logits = logits.astype(np.float32).copy()
    k = ids.shape[-1]
    eq = ids[..., :, None] == ids[..., None, :]
    dup = (eq & np.tril(np.ones((k, k), dtype=bool), -1)).any(-1)
    bad = dup | (ids < 0)
    ids[bad] = -1
    logits[bad] = -np.inf
    return ids, logits


def align_distribution(pivot_ids: np.ndarray, matched: np.ndarray, source_topk_ids: np.ndarray,
                       source_topk_logits: np.ndarray, vocab_map: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Top-k (ids, logits) [Lp, k] in the pivot vocab; returns also the number of one-hot positions."""
    lp = len(pivot_ids)
    ids = np.full((lp, k), -1, dtype=np.int64)
    logits = np.full((lp, k), -np.inf, dtype=np.float32)
    use = matched >= 0
    kk = min(k, source_topk_ids.shape[1])
    if use.any():
        src = matched[use]
        mapped, lg = dedupe_topk(vocab_map[source_topk_ids[src, :kk].astype(np.int64)], source_topk_logits[src, :kk])
        ids[use, :kk], logits[use, :kk] = mapped, lg
    onehot = ~(ids >= 0).any(-1)
    onehot[-1:] = False  # the last position has no next token (and no label)
    rows = np.flatnonzero(onehot)
    ids[rows, 0] = pivot_ids[rows + 1]
    logits[rows, 0] = 0.0
    return ids, logits, int(onehot.sum())


def identity_alignment(pivot_ids: np.ndarray, source_ids: np.ndarray) -> TokenAlignment | None:
    """Position i ↔ i when a same-vocabulary source tokenised the text exactly as the pivot (after an
    optional leading BOS the source added); None when the token lists differ (then DTW decides)."""
    shift = len(source_ids) - len(pivot_ids)
    if shift not in (0, 1) or not np.array_equal(source_ids[shift:], pivot_ids):
        return None
    n = len(pivot_ids)
    pos = np.arange(n, dtype=np.int64) + shift
    return TokenAlignment(indptr=np.arange(n + 1, dtype=np.int64), indices=pos, matched=pos,
                          exact=np.ones(n, dtype=bool))


def _pad_k(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] >= k:
        return a[:, :k]
    return np.concatenate([a, np.full((a.shape[0], k - a.shape[1]), fill, dtype=a.dtype)], axis=1)


def build_fused_dataset(pivot: dict[str, dict], sources: list[dict[str, dict]], pivot_surfaces: list[str],
                        source_surfaces: list[list[str]], *, method: str = "ms", k: int = 10,
                        substring_weight: float = 0.1, one_to_one: bool = True,
                        min_exact_rate: float = 0.2, names: list[str] | None = None,
                        pivot_specials: Collection[int] = ()) -> tuple[list[dict], dict[str, Any]]:
    """Fused training records (pivot = model 0, then each source) and alignment statistics."""
    names = names or [f"source{m}" for m in range(len(sources))]
    ids = [sid for sid in pivot if all(sid in s for s in sources)]
    stats: dict[str, Any] = {"samples": len(ids), "dropped_missing": len(pivot) - len(ids)}
    if not ids:
        raise FusionlabError("No sample has representations from the pivot and every source (all empty, NaN or "
                             "without assistant tokens); check the conversation data and max_length.")
    piv_strings = {sid: [strip_marker(pivot_surfaces[t]) for t in pivot[sid]["input_ids"]] for sid in ids}
    per_source = []
    for m, (src, surf) in enumerate(zip(sources, source_surfaces)):
        same_vocab = list(surf) == list(pivot_surfaces)  # e.g. a fine-tuned variant of the pivot
        aligns, pairs, n_exact, n_tok, n_identity = {}, [], 0, 0, 0
        for sid in ids:
            p, s = pivot[sid], src[sid]
            if len(s["input_ids"]) and int(s["input_ids"].max()) >= len(surf):
                raise FusionlabError(f"Source {names[m]!r} has token ids beyond its tokenizer ({len(surf)}); "
                                     "its representations were made with another tokenizer.")
            a = identity_alignment(p["input_ids"], s["input_ids"]) if same_vocab else None
            n_identity += a is not None
            if a is None:
                a = align_tokens(p["offsets"], s["offsets"], piv_strings[sid],
                                 [strip_marker(surf[t]) for t in s["input_ids"]], substring_weight, one_to_one)
            aligns[sid] = a
            pi, sj = a.pairs()
            pairs.append((s["input_ids"][sj], p["input_ids"][pi]))
            n_exact += int(a.exact.sum())
            n_tok += len(a.exact)
        exact_rate = n_exact / max(n_tok, 1)
        if exact_rate < min_exact_rate:
            raise FusionlabError(
                f"Source {names[m]!r} cannot be aligned to the pivot: only {exact_rate:.1%} of pivot tokens end "
                f"where a source token ends (need ≥ {min_exact_rate:.0%}). Its tokenizer must give character "
                "offsets of the same text (a fast tokenizer); check that it is the right tokenizer for the model.")
        used = np.unique(np.concatenate([src[sid]["topk_ids"].ravel() for sid in ids]))
        if same_vocab:  # the exact identity map: no vocabulary alignment to learn
            vmap = np.arange(len(surf), dtype=np.int64)
        else:
            counts = count_coalignments(pairs) if method == "ms" else None
            vmap = build_vocab_map(method, used, surf, pivot_surfaces, counts=counts,
                                   substring_weight=substring_weight, pivot_specials=pivot_specials)
        coverage = float((vmap[used] >= 0).mean()) if len(used) else 0.0
        stats[f"{names[m]}/exact_rate"] = round(exact_rate, 4)
        stats[f"{names[m]}/vocab_coverage"] = round(coverage, 4)
        stats[f"{names[m]}/same_vocab"] = same_vocab
        stats[f"{names[m]}/identity_rate"] = round(n_identity / len(ids), 4)  # samples aligned position by position
        per_source.append((aligns, vmap))
    records = []
    onehots = [0] * len(sources)
    for sid in ids:
        p = pivot[sid]
        tids = [_pad_k(p["topk_ids"].astype(np.int64), k, -1)]
        tlog = [_pad_k(p["topk_logits"].astype(np.float32), k, -np.inf)]
        ces = [p["ce"]]
        for m, (src, (aligns, vmap)) in enumerate(zip(sources, per_source)):
            s = src[sid]
            i_, l_, n1 = align_distribution(p["input_ids"].astype(np.int64), aligns[sid].matched, s["topk_ids"],
                                            s["topk_logits"], vmap, k)
            onehots[m] += n1
            tids.append(i_)
            tlog.append(l_)
            ces.append(s["ce"])
        records.append({"id": sid, "input_ids": p["input_ids"].astype(np.int64), "assistant": p["assistant"],
                        "target_ids": np.stack(tids), "target_logits": np.stack(tlog),
                        "ce": np.asarray(ces, dtype=np.float32)})
    n_tok = sum(len(r["input_ids"]) for r in records)
    for m, name in enumerate(names):
        stats[f"{name}/onehot_rate"] = round(onehots[m] / max(n_tok, 1), 4)
    return records, stats


def save_fused(records: list[dict], path: str | os.PathLike) -> None:
    """One safetensors file, flat over tokens (no padding), plus ``<path>.json`` with the ids."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t = {"lengths": np.asarray([len(r["input_ids"]) for r in records], dtype=np.int64),
         "input_ids": np.concatenate([r["input_ids"] for r in records]),
         "assistant": np.concatenate([r["assistant"] for r in records]).astype(np.uint8),
         # [M, ΣL, k]
         "target_ids": np.concatenate([r["target_ids"] for r in records], axis=1).astype(np.int32),
         "target_logits": np.concatenate([r["target_logits"] for r in records], axis=1),
         "ce": np.stack([r["ce"] for r in records])}
    with atomic_path(path) as tmp:
        save_file(t, str(tmp))
    atomic_write_text(Path(str(path) + ".json"), json.dumps([r["id"] for r in records]))


ST_NUMPY = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8,
            "BOOL": np.bool_, "F64": np.float64, "I16": np.int16, "I8": np.int8}


def memmap_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as a read-only ``np.memmap`` (the OS pages in what is read)."""
    path = str(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dtype, shape = ST_NUMPY[info["dtype"]], tuple(info["shape"])
        out[name] = (np.memmap(path, dtype=dtype, mode="r", offset=8 + n + a, shape=shape) if b > a
                     else np.zeros(shape, dtype=dtype))
    return out


class FusedSet(Sequence):
    """The fused training set of :func:`save_fused`, read lazily: a record is sliced out of the memory-mapped
    file when the loader asks for it, so a rank never holds the whole set in RAM (only ``lengths``, ``ce``
    and the ids are read up front). Indexing with a slice gives a view of the same file; ``candidates``
    keeps only some of the M target distributions (sliced per record)."""

    def __init__(self, path: str | os.PathLike, candidates: list[int] | None = None,
                 index: np.ndarray | None = None):
        self.path, self.candidates = str(path), candidates
        self._t: dict[str, np.ndarray] | None = None
        self.ids = json.loads(Path(self.path + ".json").read_text())
        t = self._tensors()
        self.bounds = np.concatenate([[0], np.cumsum(np.asarray(t["lengths"]))])
        self.index = np.arange(len(self.ids)) if index is None else np.asarray(index)

    def _tensors(self) -> dict[str, np.ndarray]:
        if self._t is None:  # opened in the process that reads (DataLoader workers open their own maps)
            self._t = memmap_safetensors(self.path)
        return self._t

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_t": None}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FusedSet.__new__(FusedSet)._view(self, self.index[i])
        n = int(self.index[i])
        t = self._tensors()
        a, b = self.bounds[n], self.bounds[n + 1]
        keep = slice(None) if self.candidates is None else self.candidates
        return {"id": self.ids[n], "input_ids": np.asarray(t["input_ids"][a:b], dtype=np.int64),
                "assistant": np.asarray(t["assistant"][a:b], dtype=bool),
                "target_ids": np.asarray(t["target_ids"][:, a:b], dtype=np.int64)[keep],
                "target_logits": np.asarray(t["target_logits"][:, a:b], dtype=np.float32)[keep],
                "ce": np.asarray(t["ce"][n], dtype=np.float32)[keep]}

    def _view(self, parent: "FusedSet", index: np.ndarray) -> "FusedSet":
        self.__dict__.update(parent.__getstate__())
        self.index = index
        return self

    def with_candidates(self, candidates: list[int] | None) -> "FusedSet":
        view = FusedSet.__new__(FusedSet)._view(self, self.index)
        view.candidates = candidates
        return view


def load_fused(path: str | os.PathLike, lazy: bool = True) -> FusedSet | list[dict]:
    """The fused set at ``path``: a lazy :class:`FusedSet` (default), or every record in memory."""
    if lazy:
        return FusedSet(path)
    from safetensors.numpy import load_file

    t = load_file(str(path))
    ids = json.loads(Path(str(path) + ".json").read_text())
    bounds = np.concatenate([[0], np.cumsum(t["lengths"])])
    return [{"id": sid, "input_ids": t["input_ids"][bounds[n]:bounds[n + 1]].astype(np.int64),
             "assistant": t["assistant"][bounds[n]:bounds[n + 1]].astype(bool),
             "target_ids": t["target_ids"][:, bounds[n]:bounds[n + 1]].astype(np.int64),
             "target_logits": t["target_logits"][:, bounds[n]:bounds[n + 1]], "ce": t["ce"][n]}
            for n, sid in enumerate(ids)]
