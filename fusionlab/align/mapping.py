"""FuseChat / FuseLLM vocabulary mapping: each source token id -> one pivot token id (EM / MinED / MS).

Tokens are compared by their *surfaces* (:func:`~fusionlab.align.vocab.token_surfaces`: bytes as
latin-1 text), so byte-level BPE and SentencePiece spellings of the same text are equal; edit
distances use surfaces without the word-start space, as the reference strips its markers.

Mapping methods (a plain registry, one function each):

- ``em``: exact surface match only (:func:`~fusionlab.align.vocab.surface_index`, the exact-match
  index EVA's seed dictionary uses too);
- ``mined``: exact, else the pivot token at minimum edit distance over the whole pivot vocabulary
  (:func:`~fusionlab.align.vocab.nearest_by_edit_distance`, the MinED core EVA's ``mined`` uses too);
- ``ms`` (FuseChat default): an exact surface match first; else the candidates are the pivot
  tokens that co-aligned with the source token in the corpus; pick argmin
  editdist·(0.1 if substring else 1)·sigmoid(count).

Pivot special tokens (``<|im_end|>``, BOS …) are never a mapping target: they are control tokens,
not text, and a source piece of their literal spelling must not put target mass on them.

Maps are built only for the source ids that occur (top-k ids of the representations), and
co-alignment counts are sparse (a dict of pairs), never a dense |V_p|×|V_s| matrix.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Collection, Iterable

import numpy as np

from fusionlab.align.vocab import nearest_by_edit_distance, strip_marker, surface_index
from fusionlab.errors import FusionlabError


def substring_weighted_distance(a: str, b: str, substring_weight: float = 0.1) -> float:
    """Edit distance, scaled by ``substring_weight`` when one string contains the other."""
    from rapidfuzz.distance import Levenshtein

    d = Levenshtein.distance(a, b)
    return d * substring_weight if (a in b or b in a) else float(d)


def map_em(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
           counts: dict | None = None, pivot_specials: Collection[int] = (), **_) -> dict[int, int]:
    index = surface_index(pivot_surfaces, skip=pivot_specials)
    return {int(s): index[source_surfaces[s]] for s in source_ids if source_surfaces[s] in index}


def map_mined(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
              counts: dict | None = None, pivot_specials: Collection[int] = (), **_) -> dict[int, int]:
    source_ids = [int(s) for s in source_ids]
    out = map_em(source_ids, source_surfaces, pivot_surfaces, pivot_specials=pivot_specials)
    rest = [s for s in source_ids if s not in out and source_surfaces[s]]
    skip = set(int(p) for p in pivot_specials)
    allowed = [p for p in range(len(pivot_surfaces)) if p not in skip and pivot_surfaces[p]]
    nearest = nearest_by_edit_distance([strip_marker(source_surfaces[s]) for s in rest],
                                       [strip_marker(pivot_surfaces[p]) for p in allowed])
    out.update(zip(rest, (allowed[i] for i in nearest.tolist())))
    return out


def map_ms(source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
           counts: dict | None = None, substring_weight: float = 0.1, fallback: str | None = "em",
           pivot_specials: Collection[int] = (), **_) -> dict[int, int]:
    """FuseChat's MS mapping from sparse co-alignment ``counts[(source_id, pivot_id)] = n``.

    As the reference: an exact surface match wins outright; otherwise, among the co-aligned pivot
    tokens, argmin editdist·(``substring_weight`` if substring)·sigmoid(count) on marker-stripped
    surfaces. Differences (see docs/distill.md): pivot special tokens are never candidates (Gemma's
    pieces ``<``, ``|``, ``im`` … of SmolLM2's ``<|im_end|>`` co-align with it and would teach
    end-of-turn mid-text), and ties go to the smaller distance of the unstripped surfaces
    (``' Light'`` prefers ``' Lig'`` over ``'Lig'``), then to the lower pivot id.
    """
    from rapidfuzz.distance import Levenshtein

    skip = set(int(p) for p in pivot_specials)
    by_source: dict[int, list[tuple[int, int]]] = {}
    for (s, p), n in (counts or {}).items():
        if int(p) not in skip:
            by_source.setdefault(int(s), []).append((int(p), int(n)))
    source_ids = [int(s) for s in source_ids]
    out = map_em(source_ids, source_surfaces, pivot_surfaces, pivot_specials=skip)
    for s in source_ids:
        cands = by_source.get(s)
        if s in out or not cands:
            continue
        a = strip_marker(source_surfaces[s])
        best, best_key = None, (math.inf, math.inf)
        for p, n in sorted(cands):
            d = substring_weighted_distance(a, strip_marker(pivot_surfaces[p]), substring_weight)
            key = (d / (1.0 + math.exp(-n)), Levenshtein.distance(source_surfaces[s], pivot_surfaces[p]))
            if key < best_key:
                best, best_key = p, key
        out[s] = best
    missing = [s for s in source_ids if s not in out]
    if missing and fallback:
        out.update(VOCAB_MAPPERS[fallback](missing, source_surfaces, pivot_surfaces, pivot_specials=skip))
    return out


VOCAB_MAPPERS: dict[str, Callable[..., dict[int, int]]] = {"em": map_em, "mined": map_mined, "ms": map_ms}


@dataclass
class MappingConfig:
    """FuseChat token + vocabulary alignment settings (the ``distill/mapping`` group: ms | mined | em)."""

    method: str = "ms"  # a key of VOCAB_MAPPERS
    substring_weight: float = 0.1  # edit distance × this when one token string contains the other (reference)
    one_to_one: bool = True  # 1-1 DTW pairs ending at the same character also carry the source distribution
    min_exact_rate: float = 0.2  # a source whose tokens end where pivot tokens end less often than this is an error
    min_vocab_coverage: float = 0.2  # a source whose used top-k ids map into the pivot vocab less often: an error

    def __post_init__(self) -> None:
        if self.method not in VOCAB_MAPPERS:
            raise FusionlabError(f"distill.mapping.method={self.method!r} is not a vocabulary mapping; use one of "
                                 f"{sorted(VOCAB_MAPPERS)} (distill/mapping=ms|mined|em).")
        if not self.substring_weight >= 0:
            raise FusionlabError(f"distill.mapping.substring_weight={self.substring_weight} must be >= 0 "
                                 "(the reference uses 0.1).")
        if not 0.0 <= self.min_vocab_coverage <= 1.0:
            raise FusionlabError(f"distill.mapping.min_vocab_coverage={self.min_vocab_coverage} must lie in [0, 1] "
                                 "(the share of the source's used top-k ids that map to a pivot token).")
        if not 0.0 <= self.min_exact_rate <= 1.0:
            raise FusionlabError(f"distill.mapping.min_exact_rate={self.min_exact_rate} must lie in [0, 1] "
                                 "(the share of pivot tokens that end where a source token ends).")


def build_vocab_map(method: str, source_ids: Iterable[int], source_surfaces: list[str], pivot_surfaces: list[str],
                    counts: dict | None = None, pivot_specials: Collection[int] = (), **kwargs) -> np.ndarray:
    """An int64 array over the source vocab: pivot id for each mapped source id, -1 elsewhere
    (``pivot_specials``: pivot ids never mapped onto)."""
    if method not in VOCAB_MAPPERS:
        raise FusionlabError(f"Unknown vocabulary mapping {method!r}; use one of {sorted(VOCAB_MAPPERS)}.")
    mapping = VOCAB_MAPPERS[method](sorted(set(int(s) for s in source_ids)), source_surfaces, pivot_surfaces,
                                    counts=counts, pivot_specials=pivot_specials, **kwargs)
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
