"""Token surfaces and source→pivot vocabulary mapping (EM / MinED / MS).

A token's *surface* is its bytes (as a latin-1 string, so one char = one byte): byte-level BPE
(`Ġ`, `Ċ`) and SentencePiece (`▁`, `<0x0A>`) tokens of the same text then compare equal,
e.g. ``Ġhello`` and ``▁hello`` are both ``" hello"``. Edit distances use surfaces with the
leading word-start space stripped, as the reference strips its markers.

Mapping methods (a plain registry, one function each):

- ``em``: exact surface match only;
- ``mined``: exact, else the pivot token at minimum edit distance over the whole pivot vocab;
- ``ms`` (FuseChat default): candidates are the pivot tokens that co-aligned with the source
  token in the corpus; pick argmin editdist·(0.1 if substring else 1)·sigmoid(count).

Maps are built only for the source ids that occur (top-k ids of the representations), and
co-alignment counts are sparse (a dict of pairs), never a dense |V_p|×|V_s| matrix.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterable

import numpy as np

from fusionlab.align.vocab import token_bytes
from fusionlab.errors import FusionlabError


def token_surfaces(tokenizer) -> list[str]:
    """The surface of every id of ``tokenizer``: its bytes as a latin-1 str (one char = one byte).

    The bytes come from :func:`fusionlab.align.vocab.token_bytes`, the one place that knows how
    byte-level BPE and SentencePiece spell text; special tokens keep their literal text.
    """
    return [b.decode("latin-1") if b is not None else "" for b in token_bytes(tokenizer)]


def strip_marker(surface: str) -> str:
    """Drop the word-start space (the reference strips Ġ/▁ before comparing tokens)."""
    return surface[1:] if surface.startswith(" ") and len(surface) > 1 else surface


def substring_weighted_distance(a: str, b: str, substring_weight: float = 0.1) -> float:
    """Edit distance, scaled by ``substring_weight`` when one string contains the other."""
    from rapidfuzz.distance import Levenshtein

    d = Levenshtein.distance(a, b)
    return d * substring_weight if (a in b or b in a) else float(d)


def _exact_index(pivot_surfaces: list[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, s in enumerate(pivot_surfaces):
        index.setdefault(s, i)  # first id wins for duplicated surfaces
    return index


def map_em(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
           counts: dict | None = None, **_) -> dict[int, int]:
    index = _exact_index(pivot_surfaces)
    return {int(s): index[source_surfaces[s]] for s in source_ids if source_surfaces[s] in index}


def map_mined(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
              counts: dict | None = None, **_) -> dict[int, int]:
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    index = _exact_index(pivot_surfaces)
    stripped = [strip_marker(p) for p in pivot_surfaces]
    out = {}
    for s in source_ids:
        s = int(s)
        surf = source_surfaces[s]
        if surf in index:
            out[s] = index[surf]
        elif surf:
            hit = process.extractOne(strip_marker(surf), stripped, scorer=Levenshtein.distance)
            if hit is not None:
                out[s] = int(hit[2])
    return out


def map_ms(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
           counts: dict | None = None, substring_weight: float = 0.1, fallback: str = "em", **_) -> dict[int, int]:
    """FuseChat's MS mapping from sparse co-alignment ``counts[(source_id, pivot_id)] = n``."""
    by_source: dict[int, list[tuple[int, int]]] = {}
    for (s, p), n in (counts or {}).items():
        by_source.setdefault(int(s), []).append((int(p), int(n)))
    source_ids = [int(s) for s in source_ids]
    out = {}
    for s in source_ids:
        cands = by_source.get(s)
        if not cands:
            continue
        a = strip_marker(source_surfaces[s])
        best, best_d = None, math.inf
        for p, n in sorted(cands):
            d = substring_weighted_distance(a, strip_marker(pivot_surfaces[p]), substring_weight)
            d *= 1.0 / (1.0 + math.exp(-n))
            if d < best_d:
                best, best_d = p, d
        out[s] = best
    missing = [s for s in source_ids if s not in out]
    if missing and fallback:
        out.update(VOCAB_MAPPERS[fallback](missing, source_surfaces, pivot_surfaces))
    return out


VOCAB_MAPPERS: dict[str, Callable[..., dict[int, int]]] = {"em": map_em, "mined": map_mined, "ms": map_ms}


def build_vocab_map(method: str, source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
                    counts: dict | None = None, **kwargs) -> np.ndarray:
    """An int64 array over the source vocab: pivot id for each mapped source id, -1 elsewhere."""
    if method not in VOCAB_MAPPERS:
        raise FusionlabError(f"Unknown vocabulary mapping {method!r}; use one of {sorted(VOCAB_MAPPERS)}.")
    mapping = VOCAB_MAPPERS[method](sorted(set(int(s) for s in source_ids)), source_surfaces, pivot_surfaces,
                                    counts=counts, **kwargs)
    arr = np.full(len(source_surfaces), -1, dtype=np.int64)
    for s, p in mapping.items():
        arr[s] = p
    return arr


def count_coalignments(pairs: Iterable[tuple[np.ndarray, np.ndarray]]) -> Counter:
    """Sparse co-alignment counts from (source_ids, pivot_ids) arrays of aligned token pairs."""
    c: Counter = Counter()
    for s, p in pairs:
        c.update(zip(np.asarray(s).tolist(), np.asarray(p).tolist()))
    return c
