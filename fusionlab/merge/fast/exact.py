"""Fast, bit-exact stand-ins for the torch kernels whose results mergekit's numbers depend on.

**Which entries a sort keeps at a cut.** mergekit keeps "the top k by magnitude" with
``torch.argsort(w, descending=True)[:k]`` (TIES), ``torch.sort(w).indices[lo:hi]`` (breadcrumbs)
and ``torch.topk(w, k)`` (SCE). When equal values straddle the cut, which of them are kept is
decided by torch's CPU kernels, which are not stable: ``sort`` is libstdc++'s ``std::sort``
(introsort) and ``topk`` with ``k > n/64`` is ``std::nth_element`` (introselect). Real deltas have
such ties on most large tensors (fine-tuned fp32 weights move on the ulp grid of the base), so
"the same set as mergekit" needs that order. Both algorithms apply one partition step again and
again: move the median of three to the front, then Hoare's unguarded partition. Only the
partitions that contain the cut decide which entries end up before it; std::sort's final
insertion sort is stable within each segment of at most 16. :func:`_replay` repeats exactly
those partitions, each as a few vectorised numpy passes over its segment: O(n) work instead of
O(n log n) comparisons on (value, index) pairs.

**Variance across models** (SCE's selection). ``torch.var(x, dim=0)`` on CPU runs Welford's
update in float64 per output element, ~0.1 µs per element when the reduced dim is the outer
one. :func:`population_variance` runs the same float64 updates as vectorised passes over
cache-sized chunks (~15× faster), so every rounding is the same.

A self-check (first use) compares both with torch on random and tie-heavy inputs; where they
differ (another C++ standard library, a torch that changed its kernels) torch's own ops run.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

_SORT_THRESHOLD = 16  # libstdc++ _S_threshold: std::sort stops partitioning at 16 elements
_SELECT_THRESHOLD = 3  # std::nth_element stops at 3
_REPLAY_MIN_SIZE = 4096  # below this torch's own sort is faster than the Python-driven replay
_CHUNK = 1 << 16  # elements per chunk of the float64 Welford passes (fits in L2)


def _median_to_front(a: np.ndarray, idx: np.ndarray, lo: int, hi: int, descending: bool) -> None:
    """libstdc++ ``__move_median_to_first(lo, lo + 1, mid, hi - 1)`` with comp = ``>`` or ``<``."""
    ia, ib, ic = lo + 1, lo + (hi - lo) // 2, hi - 1
    va, vb, vc = a[ia], a[ib], a[ic]
    if descending:
        ab, bc, ac = va > vb, vb > vc, va > vc
    else:
        ab, bc, ac = va < vb, vb < vc, va < vc
    if ab:
        m = ib if bc else (ic if ac else ia)
    elif ac:
        m = ia
    else:
        m = ic if bc else ib
    a[lo], a[m] = a[m], a[lo]
    idx[lo], idx[m] = idx[m], idx[lo]


def _partition(a: np.ndarray, idx: np.ndarray, lo: int, hi: int, k: int, descending: bool) -> int:
    """libstdc++ ``__unguarded_partition_pivot`` on ``a[lo:hi]``; returns the cut.

    The left scan stops at entries not ordered before the pivot, the right scan at entries not
    ordered after it; the i-th left stop is swapped with the i-th right stop while they have not
    crossed. So the swaps are the first ``s`` pairs of the two stop lists, found by bisection.
    Only what the caller still reads is written: the values of the side holding position ``k``
    and the indices of both sides (positions before the cut are kept).
    """
    _median_to_front(a, idx, lo, hi, descending)
    p = a[lo]
    seg, seg_idx = a[lo + 1:hi], idx[lo + 1:hi]
    left_stops = np.flatnonzero(seg <= p if descending else seg >= p)
    right_stops = np.flatnonzero(seg >= p if descending else seg <= p)[::-1]
    i, j = 0, min(len(left_stops), len(right_stops))
    while i < j:  # first pair that crossed (the pairs' order is monotone)
        h = (i + j) >> 1
        if left_stops[h] < right_stops[h]:
            i = h + 1
        else:
            j = h
    s = i
    if s == 0:
        return lo + 1 + int(left_stops[0])
    c = int(right_stops[s - 1])
    if s < len(left_stops):
        c = min(c, int(left_stops[s]))
    left, right = left_stops[:s], right_stops[:s]  # the swapped pairs
    if lo + 1 + c > k:  # the right side is out: only the left side's values and indices matter
        seg[left] = seg[right]
        seg_idx[left] = seg_idx[right]
    else:  # the left side is in (its indices are read at the end), the right side goes on
        seg[right] = seg[left]
        moved = seg_idx[left]
        seg_idx[left] = seg_idx[right]
        seg_idx[right] = moved
    return lo + 1 + c


def _replay(a: np.ndarray, k: int, descending: bool, threshold: int, depth: int | None = None) -> np.ndarray | None:
    """Indices of the entries std::sort (threshold 16) / std::nth_element(k - 1) (threshold 3)
    leaves in positions ``[0, k)``; ``None`` where the reference falls back to heapsort."""
    n = a.shape[0]
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    lo, hi = 0, n
    depth = 2 * (n.bit_length() - 1) if depth is None else depth  # 2·⌊log2 n⌋, as in libstdc++
    while hi - lo > threshold:
        if depth == 0:
            return None  # heapsort of this segment (adversarial inputs only): let torch do it
        depth -= 1
        cut = _partition(a, idx, lo, hi, k, descending)
        if cut == k:
            return idx[:k]
        if k < cut:
            hi = cut
        else:
            lo = cut
    # the last segment is insertion-sorted: stable
    order = np.argsort(-a[lo:hi] if descending else a[lo:hi], kind="stable")
    return np.concatenate([idx[:lo], idx[lo:hi][order[:k - lo]]])


def _torch_prefix(w: torch.Tensor, k: int, descending: bool, kind: str) -> torch.Tensor:
    if kind == "topk":
        return torch.topk(w, k=k, largest=descending).indices
    return torch.sort(w, descending=descending).indices[:k]


def _self_check() -> bool:
    """Does the replay pick what this torch build picks? (tie-heavy inputs, both kernels)"""
    g = torch.Generator().manual_seed(0)
    for n, levels in ((40, 3), (1000, 7), (5000, 50), (20000, 1000)):
        w = torch.randint(0, levels, (n,), generator=g).float()
        for k in (1, n // 3, n // 2 + 1, n - 1):
            for descending in (True, False):
                for kind in ("sort", "topk"):
                    if kind == "topk" and k * 64 <= n:
                        continue
                    want = torch.zeros(n, dtype=torch.bool)
                    want[_torch_prefix(w, k, descending, kind)] = True
                    got = _replay(w.numpy().copy(), k, descending,
                                  _SORT_THRESHOLD if kind == "sort" else _SELECT_THRESHOLD)
                    if got is None:
                        continue
                    mask = torch.zeros(n, dtype=torch.bool)
                    mask[torch.from_numpy(got).long()] = True
                    if not torch.equal(mask, want):
                        return False
    return True


@functools.cache
def replay_available() -> bool:
    """Checked once per process."""
    ok = _self_check()
    if not ok:
        log.warning("torch's CPU sort is not libstdc++'s here; exact tie selection uses torch.sort (slower).")
    return ok


def reference_prefix_mask(w: torch.Tensor, k: int, descending: bool = True, kind: str = "sort",
                          overwrite: bool = False) -> torch.Tensor:
    """Bool mask of the entries of 1-D ``w`` that ``torch.sort(w, descending).indices[:k]``
    (``kind="sort"``) or ``torch.topk(w, k, largest=descending).indices`` (``kind="topk"``) return.

    ``overwrite=True`` lets the CPU replay reorder ``w`` in place (saves a copy).
    """
    n = w.numel()
    mask = torch.zeros(n, dtype=torch.bool, device=w.device)
    if k <= 0:
        return mask
    if k >= n:
        return mask.fill_(True)
    threshold = _SORT_THRESHOLD if kind == "sort" else _SELECT_THRESHOLD
    usable = (w.device.type == "cpu" and w.dtype == torch.float32 and n >= _REPLAY_MIN_SIZE
              and not (kind == "topk" and k * 64 <= n) and replay_available())
    chosen = None
    if usable:
        a = w.detach().numpy() if overwrite else w.detach().numpy().copy()
        if not np.isnan(a.sum(dtype=np.float64)):
            chosen = _replay(a, k, descending, threshold)
    if chosen is None:
        mask[_torch_prefix(w, k, descending, kind)] = True
        return mask
    mask.numpy()[chosen] = True
    return mask


def stable_prefix_mask(w: torch.Tensor, m: int, descending: bool) -> torch.Tensor:
    """Mask of the first ``m`` entries of a STABLE sort of 1-D ``w`` (ties in index order), in O(n)."""
    n = w.numel()
    if m <= 0:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    if m >= n:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    v = torch.kthvalue(w, n - m + 1 if descending else m).values
    mask = w > v if descending else w < v
    need = m - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(w == v).reshape(-1)[:need]] = True
    return mask


def rank_range_mask(w: torch.Tensor, lo: int, hi: int, descending: bool = False,
                    tie_break: str = "mergekit", overwrite: bool = False) -> torch.Tensor:
    """Entries at sorted positions ``[lo, hi)`` of 1-D ``w``: ties as torch's sort (``mergekit``,
    what mergekit gets) or by index (``index``, a stable sort). ``overwrite``: ``w`` may be reordered."""
    if tie_break == "index":
        mask = stable_prefix_mask(w, hi, descending)
        return mask & ~stable_prefix_mask(w, lo, descending) if lo > 0 else mask
    if tie_break != "mergekit":
        raise FusionlabError(f"Unknown tie_break {tie_break!r}; use mergekit (exact, default) or index.")
    mask = reference_prefix_mask(w, hi, descending, "sort", overwrite=overwrite and lo <= 0)
    if lo > 0:
        mask &= ~reference_prefix_mask(w, lo, descending, "sort", overwrite=overwrite)
    return mask


def _welford_variance(x: np.ndarray) -> np.ndarray:
    """Population variance over axis 0 of float32 ``x`` (N, n): torch's CPU Welford, in float64."""
    count, n = x.shape
    out = np.empty(n, dtype=np.float32)
    size = min(n, _CHUNK)
    mean, m2, delta, value, tmp = (np.empty(size) for _ in range(5))
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        c = stop - start
        mv, m2v, dv, xv, tv = mean[:c], m2[:c], delta[:c], value[:c], tmp[:c]
        mv[...] = x[0, start:stop]  # after the first update: mean = x0, m2 = 0 (exactly)
        m2v.fill(0.0)
        for i in range(1, count):
            xv[...] = x[i, start:stop]
            np.subtract(xv, mv, out=dv)  # delta = x - mean
            np.divide(dv, i + 1, out=tv)
            np.add(mv, tv, out=mv)  # mean += delta / n
            np.subtract(xv, mv, out=tv)  # x - new mean
            np.multiply(dv, tv, out=tv)
            np.add(m2v, tv, out=m2v)  # m2 += delta * (x - new mean)
        np.divide(m2v, count, out=m2v)
        with np.errstate(over="ignore"):  # beyond float32 range: inf, as torch's cast gives
            out[start:stop] = m2v
    return out


@functools.cache
def _variance_available() -> bool:
    """Does the float64 Welford give torch.var's bits on this build? (checked once per process)"""
    g = torch.Generator().manual_seed(0)
    for count, n, scale in ((2, 3000, 1.0), (3, 70_001, 1e-3), (5, 1000, 1e4)):
        x = torch.randn(count, n, generator=g) * scale
        x[:, :100] = torch.randint(-3, 4, (count, 100), generator=g).float()  # exact ties, zero variance
        want = torch.var(x, dim=0, unbiased=False)
        if not torch.equal(torch.from_numpy(_welford_variance(x.numpy())), want):
            log.warning("torch.var does not match fusionlab's float64 Welford here; using torch.var (slower).")
            return False
    return True


def population_variance(x: torch.Tensor) -> torch.Tensor:
    """``torch.var(x, dim=0, unbiased=False)``, bit for bit, faster on CPU float32."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() < 2 or x.shape[0] < 2
            or not _variance_available()):
        return torch.var(x, dim=0, unbiased=False)
    flat = x.detach().reshape(x.shape[0], -1).contiguous().numpy()
    return torch.from_numpy(_welford_variance(flat)).reshape(x.shape[1:])
