"""Supervised VecMap (Artetxe et al., 2018) and CSLS retrieval, in torch, blocked for big vocabularies.

The mapping follows VecMap's supervised recipe exactly as EVA runs it: unit -> center -> unit
normalisation, whitening with the seed rows, an orthogonal map from the SVD of the seed
cross-covariance, re-weighting by S^0.5 and de-whitening each side with its own whitening.
Hidden sizes may differ: the SVD is the reduced one, so both sides land in min(dx, dz) dims.
"""
from __future__ import annotations

import functools
import math
import os
import time

import torch
from tqdm.auto import tqdm


def normalize(m: torch.Tensor, steps=("unit", "center", "unit")) -> torch.Tensor:
    m = m.clone()
    for step in steps:
        if step == "unit":
            m /= m.norm(dim=1, keepdim=True).clamp_min(1e-12)
        elif step == "center":
            m -= m.mean(dim=0, keepdim=True)
        else:
            raise ValueError(f"unknown normalisation step {step!r}")
    return m


def _whitening(m: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, W^-1) with W = V Σ^-1 V^T from the SVD of ``m``: ``m @ W`` has identity covariance.

    With at least as many rows as columns, V and Σ² come from the eigendecomposition of the
    small Gram matrix mᵀm (d×d): the same W as VecMap's SVD of the n×d seed matrix, ~10x faster.
    """
    m = m.double()
    if m.shape[0] >= m.shape[1]:
        evals, v = torch.linalg.eigh(m.T @ m)
        s = evals.clamp_min(0).sqrt()
    else:  # rank-deficient: the reduced SVD keeps W on the seed rows' span (as VecMap does)
        _, s, vt = torch.linalg.svd(m, full_matrices=False)
        v = vt.T
    s = s.clamp_min(eps * s.max())
    w = (v / s) @ v.T
    w_inv = (v * s) @ v.T
    return w, w_inv


def supervised_map(x: torch.Tensor, z: torch.Tensor, x_seed: torch.Tensor, z_seed: torch.Tensor,
                   whiten: bool = True, reweight: float = 0.5, dewhiten: bool = True,
                   dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Map source rows ``x`` and target rows ``z`` into one space using the seed pairs.

    ``x_seed[k]`` and ``z_seed[k]`` are the row ids of the k-th seed pair. Returns the mapped
    (x, z), both float32 with the same number of columns (``dim`` keeps only the leading
    dimensions, like VecMap's ``--dim_reduction``).
    """
    x = normalize(x.float())
    z = normalize(z.float())
    xs, zs = x[x_seed].double(), z[z_seed].double()
    if whiten:
        wx1, wx1_inv = _whitening(xs)
        wz1, wz1_inv = _whitening(zs)
        xs, zs = xs @ wx1, zs @ wz1
    u, s, vt = torch.linalg.svd(xs.T @ zs, full_matrices=False)  # U: dx×r, V: dz×r
    v = vt.T
    # The whole linear transform of each side, composed into one small matrix (dx×r, dz×r).
    tx, tz = u * s.pow(reweight), v * s.pow(reweight)
    if whiten:
        tx = wx1 @ tx
        tz = wz1 @ tz
        if dewhiten:
            tx = tx @ (u.T @ wx1_inv @ u)
            tz = tz @ (v.T @ wz1_inv @ v)
    if dim:
        tx, tz = tx[:, :dim], tz[:, :dim]
    return x @ tx.float(), z @ tz.float()


def _unit(m: torch.Tensor) -> torch.Tensor:
    return m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=None)
def fast_search_dtype(device: str = "cpu") -> torch.dtype:
    """bfloat16 where its matrix products are faster than float32 (GPUs, CPUs with AMX/AVX512-BF16),
    else float32: measured once on a small product rather than guessed from CPU flags."""
    if device != "cpu":
        return torch.bfloat16
    def seconds(dtype: torch.dtype) -> float:
        a, b = torch.randn(512, 576).to(dtype), torch.randn(576, 4096).to(dtype)
        a @ b
        start = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - start
    return torch.bfloat16 if seconds(torch.bfloat16) < 0.7 * seconds(torch.float32) else torch.float32


SEARCH_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact float32 cosines of each unit row ``a[i]`` (n, d) with its candidates ``b[i]`` (n, c, d)."""
    return torch.einsum("nd,ncd->nc", a, b)


@torch.no_grad()
def csls_topk(x: torch.Tensor, z: torch.Tensor, k: int = 10, neighborhood: int = 1, threshold: float = 0.1,
              std_filter: tuple[int, float] | None = (5, 0.01), excluded_cols: torch.Tensor | None = None,
              rows: torch.Tensor | None = None, block: int = 2048, search_dtype: str = "auto", margin: int = 16,
              progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` CSLS targets for each source row, without ever holding the full score matrix.

    score(i, j) = 2·cos(x_i, z_j) − r(j), r(j) = mean cosine of z_j's ``neighborhood`` nearest
    source rows (over ``rows``). Two blocked passes over the source rows (``block`` rows each): the
    first accumulates each target's nearest source rows, the second scores each block and keeps its
    top-k. (A one-pass candidate search plus a bound needed an exact re-score of ~90% of the rows
    for SmolLM2×Gemma-3: two plain passes are cheaper.)

    Both passes search in ``search_dtype`` (auto: bfloat16 where it is faster, 4-8x on AMX CPUs and
    GPUs) but decide in float32: the search keeps ``neighborhood + 4`` candidate rows per target and
    ``k + margin`` candidate targets per row, and every kept cosine is recomputed exactly in float32
    before r(j), the top-k, the threshold and the std filter use it. bfloat16's product error
    (~1e-4 on a cosine) is far below the score gap between rank k and rank k + margin, so the result
    equals the float32 search's (experiments/eva/RESULTS.md measures the agreement).

    Returns (cols, vals, top1): ``cols``/``vals`` are (n_x, k) with -1/0 padding for dropped
    entries (below ``threshold``, or rows whose > n kept scores have std ≤ s: ``std_filter``);
    ``top1`` is each row's best target before filtering (-1 for rows not computed).
    """
    n_x, n_z, dev = x.shape[0], z.shape[0], x.device
    dtype = SEARCH_DTYPES[search_dtype] or fast_search_dtype(dev.type)
    approx = dtype != torch.float32
    x, z = _unit(x.float()), _unit(z.float().to(dev))
    rows = torch.arange(n_x, device=dev) if rows is None else rows.to(dev)
    targets = torch.arange(n_z, device=dev)  # excluded columns are never scored at all
    if excluded_cols is not None and len(excluded_cols):
        allowed = torch.ones(n_z, dtype=torch.bool, device=dev)
        allowed[excluded_cols.to(dev)] = False
        targets = targets[allowed]
    zc = z[targets]
    n_t = len(targets)
    blocks = range(0, len(rows), block)
    # pass 1: each target's nearest source rows (candidates in the search dtype, values exact)
    n_near = min(neighborhood + (4 if approx else 0), len(rows))
    z_s = zc.to(dtype)
    near_v = torch.full((n_t, 0), -math.inf, device=dev)
    near_i = torch.empty((n_t, 0), dtype=torch.long, device=dev)
    for start in tqdm(blocks, desc="CSLS r(j)", disable=not progress, leave=False):
        idx = rows[start:start + block]
        sim = z_s @ x[idx].to(dtype).T  # (targets, block): reductions run along contiguous rows
        if n_near == 1:
            v, i = sim.max(dim=1, keepdim=True)
        else:
            v, i = sim.topk(min(n_near, sim.shape[1]), dim=1)
        near_v, pos = torch.cat([near_v, v.float()], 1).topk(min(n_near, near_v.shape[1] + v.shape[1]), dim=1)
        near_i = torch.cat([near_i, idx[i]], 1).gather(1, pos)
        del sim
    if approx:  # recompute the candidates' cosines exactly, in chunks of targets
        for s in range(0, n_t, 4096):
            near_v[s:s + 4096] = _cosines(zc[s:s + 4096], x[near_i[s:s + 4096]])
    bias = near_v.topk(min(neighborhood, near_v.shape[1]), dim=1).values.mean(dim=1)
    # pass 2: score/2 = cos − r/2 as one product of [x, 1] and [z, −r/2]; top (k + margin) candidates
    kk = min(k, n_t)
    n_cand = min(kk + (margin if approx else 0), n_t)
    zt_aug = torch.cat([zc, -0.5 * bias[:, None]], 1).to(dtype).T.contiguous()
    ones = torch.ones(block, 1, device=dev)
    top_s = torch.empty(len(rows), kk, device=dev)
    top_c = torch.empty(len(rows), kk, dtype=torch.long, device=dev)
    for start in tqdm(blocks, desc="CSLS top-k", disable=not progress, leave=False):
        idx = rows[start:start + block]
        half = torch.cat([x[idx], ones[:len(idx)]], 1).to(dtype) @ zt_aug
        v, c = half.topk(n_cand, dim=1)
        del half
        if approx:
            v = 2 * _cosines(x[idx], zc[c]) - bias[c]
            v, pos = v.topk(kk, dim=1)
            c = c.gather(1, pos)
        else:
            v = 2 * v
        top_s[start:start + block], top_c[start:start + block] = v, targets[c]
    keep = top_s >= threshold
    if std_filter is not None:
        n_min, s_max = std_filter
        cnt = keep.sum(dim=1)
        vals_masked = torch.where(keep, top_s, torch.zeros_like(top_s))
        mean = vals_masked.sum(1) / cnt.clamp_min(1)
        var = (torch.where(keep, top_s - mean[:, None], torch.zeros_like(top_s)) ** 2).sum(1) / cnt.clamp_min(1)
        flat = (cnt > n_min) & (var.sqrt() <= s_max)
        keep &= ~flat[:, None]
    rows, keep, top_s, top_c = rows.cpu(), keep.cpu(), top_s.cpu(), top_c.cpu()
    cols = torch.full((n_x, kk), -1, dtype=torch.long)
    vals = torch.zeros(n_x, kk)
    cols[rows] = torch.where(keep, top_c, torch.full_like(top_c, -1))
    vals[rows] = torch.where(keep, top_s, torch.zeros_like(top_s))
    top1 = torch.full((n_x,), -1, dtype=torch.long)
    top1[rows] = top_c[:, 0]
    return cols, vals, top1
