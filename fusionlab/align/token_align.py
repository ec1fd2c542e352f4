"""Alignment of two tokenisations of the same text (FuseChat / FuseLLM distillation).

Tokens whose character spans END at the same offset align exactly (they predict the same
next character). Between two such anchors lies a short *segment* where the tokenisations
disagree; only there does dynamic time warping run, with cost = edit distance of the token
strings (word-start markers stripped; × ``substring_weight`` when one contains the other, as
the reference does). The reference runs a pure-Python DTW over the full 2048×2048 grid
(~14 s per sample); segments are usually 2–6 tokens wide, so this costs O(L).

The DTW recurrence and tie-breaking follow the reference:
M[i+1, j+1] = cost(i, j) + min(M[i, j+1], M[i+1, j], M[i, j]); the backtrace from the last
cell prefers the diagonal, then a pivot step, then a source step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """Minimum-cost monotone path from (0, 0) to (n-1, m-1) through ``cost`` [n, m]."""
    cost = np.asarray(cost, dtype=np.float64)
    n, m = cost.shape
    D = np.full((n + 1, m + 1), np.inf)
    D[0, 0] = 0.0
    if n * m <= 256:
        for i in range(n):
            row, prev = D[i + 1], D[i]
            c = cost[i]
            for j in range(m):
                a, b, d = prev[j + 1], row[j], prev[j]
                row[j + 1] = c[j] + (a if a < b and a < d else (b if b < d else d))
    else:  # anti-diagonal wavefront: each diagonal depends only on the two before it
        for s in range(2, n + m + 1):
            i = np.arange(max(1, s - m), min(n, s - 1) + 1)
            j = s - i
            D[i, j] = cost[i - 1, j - 1] + np.minimum(np.minimum(D[i - 1, j], D[i, j - 1]), D[i - 1, j - 1])
    M = D[1:, 1:]
    i, j = n - 1, m - 1
    path = [(i, j)]
    while i > 0 or j > 0:
        diag = M[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        up = M[i - 1, j] if i > 0 else np.inf
        left = M[i, j - 1] if j > 0 else np.inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
        path.append((i, j))
    path.reverse()
    return path


def cost_matrix(a: list[str], b: list[str], substring_weight: float = 0.1) -> np.ndarray:
    """Edit distances between token strings (C speed via rapidfuzz), substring pairs scaled down."""
    from rapidfuzz.distance import Levenshtein
    from rapidfuzz.process import cdist

    c = cdist(a, b, scorer=Levenshtein.distance, dtype=np.float64)
    if substring_weight != 1.0:
        for x, sa in enumerate(a):
            for y, sb in enumerate(b):
                if sa in sb or sb in sa:
                    c[x, y] *= substring_weight
    return c


@dataclass
class TokenAlignment:
    """Per pivot position, the aligned source positions (CSR) and the one usable for distributions.

    ``matched[i]`` is the source position whose distribution stands in for pivot position i
    (spans end at the same character, or, with ``one_to_one``, a 1-1 DTW pair of the same token
    string ending at the same character, e.g. the byte tokens of a character both split alike), else -1. A 1-1 pair that ends elsewhere (pivot
    ``" L"`` vs source ``" Light"``) predicts different text (``ightly`` vs ``ly``): never used.
    """

    indptr: np.ndarray  # [Lp + 1]
    indices: np.ndarray  # [nnz] source positions
    matched: np.ndarray  # [Lp] source position or -1
    exact: np.ndarray  # [Lp] bool: matched by character offset

    def aligned(self, i: int) -> list[int]:
        return self.indices[self.indptr[i]:self.indptr[i + 1]].tolist()

    def pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(pivot positions, source positions) of every aligned pair."""
        piv = np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))
        return piv, self.indices


def _effective_ends(offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Monotone end offsets, and which tokens really end a character run (the last of a split char)."""
    ends = np.maximum.accumulate(np.asarray(offsets, dtype=np.int64)[:, 1]) if len(offsets) else np.zeros(0, np.int64)
    eligible = np.ones(len(ends), dtype=bool)
    if len(ends) > 1:
        eligible[:-1] = ends[:-1] < ends[1:]
    return ends, eligible


def align_tokens(pivot_offsets: np.ndarray, source_offsets: np.ndarray, pivot_strings: list[str],
                 source_strings: list[str], substring_weight: float = 0.1, one_to_one: bool = True) -> TokenAlignment:
    """Align pivot tokens to source tokens of the same text (see module docstring)."""
    lp, ls = len(pivot_offsets), len(source_offsets)
    pe, pok = _effective_ends(pivot_offsets)
    se, sok = _effective_ends(source_offsets)
    pi_idx = np.flatnonzero(pok)
    sj_idx = np.flatnonzero(sok)
    _, a, b = np.intersect1d(pe[pi_idx], se[sj_idx], assume_unique=True, return_indices=True)
    anchors = list(zip(pi_idx[a].tolist(), sj_idx[b].tolist()))
    lists: list[list[int]] = [[] for _ in range(lp)]
    matched = np.full(lp, -1, dtype=np.int64)
    exact = np.zeros(lp, dtype=bool)
    src_degree = np.zeros(ls, dtype=np.int64)

    def run_segment(i0: int, i1: int, j0: int, j1: int) -> None:  # half-open ranges, both non-empty
        if i1 - i0 == 1 and j1 - j0 == 1:
            lists[i0].append(j0)
            src_degree[j0] += 1
            return
        cost = cost_matrix(pivot_strings[i0:i1], source_strings[j0:j1], substring_weight)
        for x, y in dtw_path(cost):
            lists[i0 + x].append(j0 + y)
            src_degree[j0 + y] += 1

    i_prev, j_prev = 0, 0
    for i, j in anchors:
        run_segment(i_prev, i + 1, j_prev, j + 1)
        matched[i], exact[i] = j, True
        i_prev, j_prev = i + 1, j + 1
    if i_prev < lp and j_prev < ls:  # unanchored tail (e.g. texts truncated differently)
        run_segment(i_prev, lp, j_prev, ls)
    if one_to_one:  # as the reference: a 1-1 pair of the same token (same string, ending at the same character)
        for i in range(lp):
            j = lists[i][0] if len(lists[i]) == 1 else -1
            if not exact[i] and j >= 0 and src_degree[j] == 1 and pe[i] == se[j] \
                    and pivot_strings[i] == source_strings[j]:
                matched[i] = j
    indptr = np.zeros(lp + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in lists])
    indices = np.fromiter((j for x in lists for j in x), dtype=np.int64, count=int(indptr[-1]))
    return TokenAlignment(indptr=indptr, indices=indices, matched=matched, exact=exact)
