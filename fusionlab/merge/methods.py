"""Merge methods: one function per method, registered (with its parameters) by its signature.

Every function merges ONE tensor (see :mod:`fusionlab.merge.registry` for the calling convention
and how the signature becomes the method's parameters). Semantics and defaults follow mergekit
(``mergekit/merge_methods``), so a mergekit YAML gives the same numbers here; options that exist
only in fusionlab are marked as such. Adding a method = one decorated function here + its YAML in
``conf/merge_method/``.

Which of the equal magnitudes at a density cut are kept (``tie_break``): ``mergekit`` (the
default) keeps exactly the entries mergekit's unstable sort keeps, found in O(n) by
:mod:`fusionlab.merge.fast.exact`; ``index`` (fusionlab only) breaks those ties by position, as a
stable sort would: the same on every platform, where mergekit's choice depends on the C++ library
torch was built with.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from fusionlab.errors import FusionlabError
from fusionlab.merge.fast.exact import population_variance, rank_range_mask, reference_prefix_mask
from fusionlab.merge.registry import PerModel, merge_method

_COMBINE_CHUNK = 1 << 20  # entries per chunk of the sign election + weighted sum

RescaleNorm = Literal["l1", "l2", "linf", "inverse_density"]  # fusionlab only: mergekit always rescales by l1
TieBreak = Literal["mergekit", "index"]  # fusionlab only, see the module docstring
Sparsifier = Callable[[Tensor, int], Tensor]  # (the engine's own delta of model i, i) -> sparsified delta


# --------------------------------------------------------------------------- sparsification
_NORMS = {"l1": lambda x: x.abs().sum(), "l2": lambda x: x.norm(), "linf": lambda x: x.abs().max()}


def _rescale(delta: torch.Tensor, mask: torch.Tensor, norm: str | None, density: float, eps: float = 1e-7,
             inplace: bool = False) -> torch.Tensor:
    """Masked delta, rescaled so its norm matches the unmasked one (mergekit), or by 1/density (DARE paper).

    ``inplace``: mask ``delta`` itself (the engine's own temporaries; same values, no new buffer)."""
    if norm not in (None, "inverse_density", *_NORMS):
        raise FusionlabError(f"Unknown rescale_norm {norm!r}; use l1, l2, linf or inverse_density.")
    before = _NORMS[norm](delta) if norm in _NORMS else None
    masked = delta.mul_(mask) if inplace else delta * mask
    if norm is None:
        return masked
    if norm == "inverse_density":
        return masked / density
    after = _NORMS[norm](masked)
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale_norm: str | None = None,
              tie_break: str = "mergekit", inplace: bool = False) -> torch.Tensor:
    """TIES: keep the top ``density`` fraction of entries by magnitude (at least one)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    w = delta.abs().reshape(-1).float()
    mask = rank_range_mask(w, 0, k, descending=True, tie_break=tie_break, overwrite=True).reshape(delta.shape)
    return _rescale(delta, mask, rescale_norm, density, inplace=inplace)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float = 0.01,
                       rescale_norm: str | None = None, tie_break: str = "mergekit", inplace: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the largest ``gamma`` fraction, then the smallest, keeping ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    target_n = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target_n - n_top)
    w = delta.abs().reshape(-1).float()
    mask = rank_range_mask(w, n_bot, n_bot + target_n, descending=False, tie_break=tie_break, overwrite=True)
    return _rescale(delta, mask.reshape(delta.shape), rescale_norm, density, inplace=inplace)


def bernoulli(delta: torch.Tensor, density: float, rescale_norm: str | None = "l1",
              generator: torch.Generator | None = None, inplace: bool = False) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return delta
    probs = torch.full_like(delta, density, dtype=torch.float32)
    mask = torch.bernoulli(probs, generator=generator).to(delta.dtype)
    return _rescale(delta, mask, rescale_norm, density, inplace=inplace)


def della_magprune(delta: torch.Tensor, density: float, epsilon: float, rescale_norm: str | None = "l1",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """DELLA: keep probability grows linearly with the magnitude rank in each row, in ``density ± epsilon``."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise FusionlabError(f"della needs 0 < density ± epsilon < 1; got density={density}, epsilon={epsilon}.")
    shape = delta.shape
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    ranks = t.abs().argsort(dim=1).argsort(dim=1).to(torch.float32) + 1
    lo, hi = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs, generator=generator).to(t.dtype)
    return _rescale(t, mask, rescale_norm, density).reshape(shape)


def sign_consensus(deltas: torch.Tensor, method: str = "sum", mask_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign (TIES); zeros never agree unless all are 0.

    ``mask_dtype``: the dtype of the sign tensors (mergekit's ``int8_mask``: int8 instead of the
    deltas' dtype, less memory, the same mask)."""
    sign = deltas.sign() if mask_dtype is None else deltas.sign().to(mask_dtype)
    if method == "sum":
        majority = (deltas.sum(dim=0) >= 0).to(sign.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(sign.dtype) * 2 - 1
    else:
        raise FusionlabError(f"Unknown consensus_method {method!r}; use sum or count.")
    return sign == majority


# --------------------------------------------------------------------------- task arithmetic family
def _task_arithmetic_family(base: Tensor, tensors: list[Tensor], weight: list[float], lambda_: float,
                            normalize: bool, sparsify: Sparsifier | None = None, consensus: str | None = None,
                            int8_mask: bool = False) -> Tensor:
    """mergekit's GeneralizedTaskArithmetic: sparsify each δᵢ, weight, (sign-elect), sum, normalise, scale."""
    if not consensus and base.dtype == torch.float32:  # accumulate in place, never stacking N deltas (same sums,
        # same order as mergekit's fp32 sum; in 16-bit its sum accumulates in fp32 and weights are rounded: stacked path)
        mixed = None
        for i, t in enumerate(tensors):
            d = t - base
            d = sparsify(d, i) if sparsify else d  # owns t - base
            d.mul_(weight[i])
            mixed = d if mixed is None else mixed.add_(d)
        divisor = torch.tensor(weight, dtype=base.dtype, device=base.device).sum()
        if normalize:
            mixed /= divisor if abs(float(divisor)) >= 1e-8 else 1.0
        if lambda_ != 1:
            mixed *= lambda_
        return base + mixed
    deltas = torch.empty((len(tensors), *base.shape), dtype=base.dtype, device=base.device)
    for i, t in enumerate(tensors):
        d = torch.sub(t, base, out=deltas[i])
        kept = sparsify(d, i) if sparsify else d
        if kept is not d:
            d.copy_(kept)
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device).reshape(-1, 1)
    deltas.view(len(tensors), -1).mul_(w)
    mask_dtype = torch.int8 if int8_mask else None

    def elect_and_sum(d: Tensor) -> Tensor:
        if consensus:
            mask = sign_consensus(d, consensus, mask_dtype)
            mixed = (d * mask).sum(dim=0)
            divisor = (w * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = d.sum(dim=0)
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lambda_ != 1:
            mixed *= lambda_
        return mixed

    return _add_per_entry(base, deltas, elect_and_sum)


def _add_per_entry(base: torch.Tensor, deltas: torch.Tensor, combine: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``base + combine(deltas)`` where ``combine`` maps (N, m) deltas to m values entry by entry:
    run over chunks of entries, so its temporaries stay small (same numbers as one call)."""
    flat, base_flat = deltas.reshape(len(deltas), -1), base.reshape(-1)
    out = torch.empty_like(base_flat)
    for start in range(0, flat.shape[1], _COMBINE_CHUNK):
        chunk = slice(start, start + _COMBINE_CHUNK)
        torch.add(base_flat[chunk], combine(flat[:, chunk]), out=out[chunk])
    return out.reshape(base.shape)


def _norm(rescale: bool, rescale_norm: str) -> str | None:
    return rescale_norm if rescale else None


@merge_method
def task_arithmetic(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], normalize: bool = False,
                    lambda_: float = 1.0) -> Tensor:
    """Task arithmetic (Ilharco et al. 2022, arXiv 2212.04089): θ_base + λ Σ wᵢ δᵢ.

    Chat vector = this with the chat model at weight = ratio."""
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize)


@merge_method
def ties(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
         normalize: bool = True, rescale: bool = False, rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0,
         int8_mask: bool = False, tie_break: TieBreak = "mergekit") -> Tensor:
    """TIES (Yadav et al. 2023, arXiv 2306.01708): keep the top-density deltas by magnitude, elect the
    sign of Σ wᵢ δᵢ, average the agreeing entries."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize, consensus="sum", int8_mask=int8_mask,
                                   sparsify=lambda d, i: magnitude(d, density[i], norm, tie_break, inplace=True))


@merge_method
def dare_linear(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
                normalize: bool = False, rescale: bool = True, rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al. 2023, arXiv 2311.03099) without sign election: keep each delta entry with
    probability density, rescale (l1 = mergekit, inverse_density = the paper's 1/p)."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize,
                                   sparsify=lambda d, i: bernoulli(d, density[i], norm, generator, inplace=True))


@merge_method
def dare_ties(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
              normalize: bool = False, rescale: bool = True, rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0,
              int8_mask: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """DARE + TIES sign election (arXiv 2311.03099)."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize, consensus="sum", int8_mask=int8_mask,
                                   sparsify=lambda d, i: bernoulli(d, density[i], norm, generator, inplace=True))


@merge_method
def breadcrumbs(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
                gamma: PerModel[float] = 0.01, normalize: bool = False, rescale: bool = False,
                rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0, tie_break: TieBreak = "mergekit") -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv 2312.06795): drop the largest gamma fraction
    and the smallest entries of each delta, keeping density."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize, sparsify=lambda d, i: magnitude_outliers(
        d, density[i], gamma[i], norm, tie_break, inplace=True))


@merge_method
def breadcrumbs_ties(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
                     gamma: PerModel[float] = 0.01, normalize: bool = False, rescale: bool = False,
                     rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0, int8_mask: bool = False,
                     tie_break: TieBreak = "mergekit") -> Tensor:
    """Model Breadcrumbs with TIES sign election (arXiv 2312.06795)."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize, consensus="sum", int8_mask=int8_mask,
                                   sparsify=lambda d, i: magnitude_outliers(d, density[i], gamma[i], norm, tie_break,
                                                                            inplace=True))


@merge_method
def della(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
          epsilon: PerModel[float] = 0.15, normalize: bool = True, rescale: bool = True,
          rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0, int8_mask: bool = False,
          generator: torch.Generator | None = None) -> Tensor:
    """DELLA (Deep et al. 2024, arXiv 2406.11617): magnitude-ranked keep probabilities in
    density ± epsilon per row, rescale, TIES sign election."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize, consensus="sum", int8_mask=int8_mask,
                                   sparsify=lambda d, i: della_magprune(d, density[i], epsilon[i], norm, generator))


@merge_method
def della_linear(base: Tensor, tensors: list[Tensor], *, weight: PerModel[float], density: PerModel[float] = 1.0,
                 epsilon: PerModel[float] = 0.15, normalize: bool = False, rescale: bool = True,
                 rescale_norm: RescaleNorm = "l1", lambda_: float = 1.0,
                 generator: torch.Generator | None = None) -> Tensor:
    """DELLA without sign election (arXiv 2406.11617)."""
    norm = _norm(rescale, rescale_norm)
    return _task_arithmetic_family(base, tensors, weight, lambda_, normalize,
                                   sparsify=lambda d, i: della_magprune(d, density[i], epsilon[i], norm, generator))


# --------------------------------------------------------------------------- other methods
@merge_method(base="input", min_models=2, weight_sum="normalize")
def linear(base: None, tensors: list[Tensor], *, weight: PerModel[float], normalize: bool = True) -> Tensor:
    """Linear / model soup (Wortsman et al. 2022, arXiv 2203.05482): Σ wᵢ θᵢ / Σ wᵢ.

    A base model, if set, is one more weighted input (as in mergekit): ``base`` is always None."""
    result = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        result.add_(t, alpha=w)
    if normalize:
        result.div_(sum(weight))
    return result


@merge_method(min_models=2)
def model_stock(base: Tensor, tensors: list[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate base → average of ≥ 2 fine-tunes
    by t = N·cosθ / (1 + (N−1)·cosθ), cosθ = mean pairwise cosine of the deltas."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [t.unsqueeze(0) if t.dim() == 1 else t for t in tensors]
    else:
        w0, ws = base.reshape(-1), [t.reshape(-1) for t in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            denom = (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)
            cos.append(((a * b).sum(dim=-1) / denom).clamp(-1, 1))
    cos_theta = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos_theta
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    t = torch.where(singular, torch.zeros_like(cos_theta),
                    n * cos_theta / torch.where(singular, torch.ones_like(denominator), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


_SLERP_DOT_THRESHOLD, _SLERP_EPS = 0.9995, 1e-8  # mergekit's constants (not options there either)


@merge_method(max_models=1)
def slerp(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """SLERP between the base and one other model over each flattened tensor; lerp when (anti)collinear.

    ``t`` may be a layer gradient, e.g. [0, 0.5, 1]."""
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > _SLERP_EPS else torch.ones_like(na)
    nb = nb if nb > _SLERP_EPS else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > _SLERP_DOT_THRESHOLD:
        return ((1 - t) * a + t * b).reshape(base.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b).reshape(base.shape)


@merge_method
def sce(base: Tensor, tensors: list[Tensor], *, select_topk: float = 1.0,
        variant: Literal["code", "paper", "fusechat"] = "code", int8_mask: bool = False) -> Tensor:
    """SCE (FuseChat, Wan et al. 2024, arXiv 2408.07990): Select by cross-model variance, Calculate
    η ∝ mean(δ²), Erase minority signs.

    variant="code" (default: mergekit's ``sce``, bit for bit): the top-``select_topk`` variance mask zeroes
    the deltas, then Φ = θ + Σ ηⱼ keepⱼ δⱼ / Σ ηⱼ keepⱼ (divisor clamped at 1e-6).
    variant="fusechat" (FuseChat's released ``sce_merging.py``, the FuseChat-2.0 merge with τ = 0.1): the
    mask is used ONLY for ηⱼ = mean((δⱼ·mask)²) (uniform if all are 0); the sign election and the average
    take the FULL deltas, divisor Σ ηⱼ keepⱼ with 0 → 1. At ``select_topk >= 1`` both are the same merge.
    variant="paper" (eq. 9; fusionlab only): Φ = θ + Σ ηⱼ keepⱼ δⱼ, no divisor.
    """
    if variant not in ("code", "paper", "fusechat"):
        raise FusionlabError(f"Unknown sce variant {variant!r}; use code (mergekit's, default), fusechat (FuseChat's "
                             "released merge code) or paper (eq. 9).")
    mask_dtype = torch.int8 if int8_mask else None
    n = len(tensors)
    tvs = torch.empty((n, *base.shape), dtype=base.dtype, device=base.device)
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=tvs[i])
    if variant == "fusechat":
        return _sce_fusechat(base, tvs, select_topk, mask_dtype)
    if select_topk < 1:
        tvs.mul_(sce_select_mask(tvs, select_topk, mask_dtype).unsqueeze(0))
    eta = tvs.square().reshape(n, -1).mean(dim=1)
    total = float(eta.sum())
    eta = (torch.ones_like(eta) / n if abs(total) < 1e-6 else eta / total).reshape(n, 1)

    def erase_and_average(d: Tensor) -> Tensor:
        weights = eta * sign_consensus(d, "sum", mask_dtype)
        merged = (d * weights).sum(dim=0)
        return merged / weights.sum(dim=0).clamp(min=1e-6) if variant == "code" else merged

    return _add_per_entry(base, tvs, erase_and_average)


def _sce_fusechat(base: Tensor, tvs: Tensor, select_topk: float, mask_dtype: torch.dtype | None) -> Tensor:
    """FuseChat's released SCE: the variance mask selects what η is computed from, never what is merged."""
    n = len(tvs)
    if select_topk < 1:
        mask = sce_select_mask(tvs, select_topk, tvs.dtype)
        energy = [float((tvs[j] * mask).square().sum()) / mask.numel() for j in range(n)]  # one masked copy at a time
    else:
        energy = [float(tvs[j].square().sum()) / tvs[j].numel() for j in range(n)]
    total = sum(energy)
    eta = torch.tensor([1.0 / n] * n if total == 0 else [e / total for e in energy], dtype=tvs.dtype,
                       device=tvs.device).reshape(n, 1)

    def erase_and_average(d: Tensor) -> Tensor:
        weights = eta * sign_consensus(d, "sum", mask_dtype)
        divisor = weights.sum(dim=0)
        return (d * weights).sum(dim=0) / torch.where(divisor == 0, torch.ones_like(divisor), divisor)

    return _add_per_entry(base, tvs, erase_and_average)


def sce_select_mask(tvs: Tensor, density: float, mask_dtype: torch.dtype | None = None) -> Tensor:
    """Keep the top ``density`` fraction (of the non-zero-variance entries) by variance across models
    (a mask of ``mask_dtype``, default the deltas' dtype)."""
    dtype = mask_dtype or tvs.dtype
    if density <= 0:
        return torch.zeros_like(tvs[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(tvs[0], dtype=dtype)
    var = population_variance(tvs)  # = torch.var(tvs, dim=0, unbiased=False), bit for bit
    k = int(int(torch.count_nonzero(var)) * density)
    if k == 0:
        return torch.zeros_like(var, dtype=dtype)
    return reference_prefix_mask(var.abs().reshape(-1), k, descending=True, kind="topk",
                                 overwrite=True).reshape(var.shape).to(dtype)


@merge_method
def varm(base: Tensor, tensors: list[Tensor]) -> Tensor:
    """VaRM (FuseChat v1, arXiv 2402.16107): per tensor, wⱼ ∝ mean((φⱼ − θ_pivot)²); result Σ wⱼ φⱼ
    (uniform if all equal the pivot). The base is the pivot."""
    var = torch.stack([(t - base).square().mean() for t in tensors])
    total = var.sum()
    w = torch.full_like(var, 1 / len(tensors)) if total <= 0 else var / total
    result = torch.zeros_like(base)
    for t, wj in zip(tensors, w):
        result.add_(t * wj)
    return result


# --------------------------------------------------------------------------- mergekit's newer methods
def _nuslerp(t: float, v0: Tensor, v1: Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> Tensor:
    """SLERP of the rows of ``v0`` and ``v1`` (or their columns, or the whole flattened tensors).

    mergekit's arithmetic, op for op (the same bits), in two reused buffers; the lerp branch is
    computed only where some row is (anti)collinear."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos_theta = torch.sum(u0.mul_(u1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    result = torch.mul(v0, torch.sin((1 - t) * theta), out=u0)
    result.add_(torch.mul(v1, torch.sin(t * theta), out=u1)).div_(torch.sin(theta))
    if bool(colinear.any()):
        result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@merge_method(base="optional", min_models=2, max_models=2)
def nuslerp(base: Tensor | None, tensors: list[Tensor], *, weight: PerModel[float], nuslerp_row_wise: bool = False,
            nuslerp_flatten: bool = True) -> Tensor:
    """NuSLERP (mergekit): SLERP of two models at t = w₂ / (w₁ + w₂), of their task vectors when a base is set;
    over the flattened tensor (default), each row, or each column (``nuslerp_row_wise``)."""
    total = sum(weight)
    t = 0.5 if abs(total) < 1e-6 else weight[1] / total
    if base is None:
        return _nuslerp(t, tensors[0], tensors[1], nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp(t, tensors[0] - base, tensors[1] - base, nuslerp_row_wise, nuslerp_flatten)


@merge_method(base="optional", weight_sum="normalize_weights")
def multislerp(base: Tensor | None, tensors: list[Tensor], *, weight: PerModel[float], normalize_weights: bool = True,
               eps: float = 1e-8) -> Tensor:
    """Multi-SLERP (Goddard 2024): barycentric interpolation on the hypersphere of N models (task vectors
    when a base is set), through the tangent space at their weighted mean; norm = the weighted mean norm."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(tensors, dim=0)
    if base is not None:
        stacked -= base
    flat = stacked.view(stacked.shape[0], -1)
    w = torch.tensor(weight, dtype=stacked.dtype, device=stacked.device)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    scratch = torch.mul(units, w.view(-1, 1))  # one (N, n) buffer for every product below (mergekit's ops)
    mean = scratch.sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stacked.shape[0] != 2:
            raise FusionlabError("multislerp: the weighted sum of the (unit) inputs is zero (antipodal inputs with "
                                 "balancing weights); change the weights.")
        result = (stacked[0] * w[0] + stacked[1] * w[1]).view(stacked.shape[1:])
        return result if base is None else result + base
    mean.div_(mean_norm)
    dots = torch.mul(units, mean, out=scratch).sum(-1, keepdim=True)
    tangent = torch.sub(units, torch.mul(dots, mean, out=scratch), out=scratch)  # units - dots * mean
    tangent_result = tangent.mul_(w.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent_result) + eps
    result = mean.mul_(torch.cos(tangent_norm)).add_(tangent_result.mul_(torch.sin(tangent_norm) / tangent_norm))
    result = result.mul_((norms.squeeze(-1) * w).sum()).view(stacked.shape[1:])
    return result if base is None else result.add_(base)


@merge_method(base="input")
def karcher(base: None, tensors: list[Tensor], *, max_iter: int = 10, tol: float = 1e-5) -> Tensor:
    """Karcher mean (arXiv 2603.04972): the Riemannian mean of the inputs' directions on the unit sphere
    (fixed-point iterations), scaled by their mean norm. A base model, if set, is one more input.

    mergekit's arithmetic op for op (the same bits), the iterations in two reused buffers."""
    if len(tensors) == 1:
        return tensors[0]
    dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    alphas = [1.0 / len(tensors)] * len(tensors)
    norms = [torch.linalg.vector_norm(t.to(dtype)) for t in tensors]
    units = [torch.zeros_like(t) if n.item() == 0.0 else (t / n).to(t.dtype) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    u = [units[i] for i in valid]
    mean = torch.zeros_like(u[0])
    for ai, ui in zip(a, u):
        mean += ai * ui
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = u[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    tangent, scratch = torch.empty_like(mean), torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        for ai, ui in zip(a, u):
            dot = torch.clamp(torch.dot(mean.flatten(), ui.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            torch.mul(dot, mean, out=scratch)
            torch.sub(ui, scratch, out=scratch)
            tangent += scratch.mul_(ai * (theta / torch.sin(theta)))
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean.mul_(torch.cos(tangent_norm)).add_(tangent.div_(tangent_norm).mul_(torch.sin(tangent_norm)))
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean.div_(unit_norm)
    return mean.mul_(sum(ai * n for ai, n in zip(alphas, norms)))


@merge_method(max_models=1)
def nearswap(base: Tensor, tensors: list[Tensor], *, t: float) -> Tensor:
    """NearSwap (alchemonaut): take the other model's value where it is within ``t`` of the base's,
    interpolating with weight t / |Δ| (clamped to [0, 1]) where it is farther."""
    other = tensors[0]
    # mergekit's weight * other + (1 - weight) * base, weight = (t / |base - other|.clamp(1e-6)).clamp(0, 1),
    # op for op in two buffers (``t / x`` is torch's ``x.reciprocal() * t``; 1 - w == -w + 1 exactly)
    weight = torch.sub(base, other).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(min=0, max=1)
    out = torch.mul(weight, other)
    return out.add_(weight.neg_().add_(1).mul_(base))


_FUSION_SAMPLE = 1_000_000  # mergekit's quantile sample size (larger tensors: quantiles of a random sample)
_FUSION_QUANTILES = (0.25, 0.5, 0.75)


@merge_method(max_models=1)
def arcee_fusion(base: Tensor, tensors: list[Tensor], *, generator: torch.Generator | None = None) -> Tensor:
    """Arcee Fusion: keep the other model's value where its importance |Δ|·KL(softmax rows) reaches
    median + 1.5·IQR of all importances; the base's elsewhere.

    Exact quantiles up to 10⁶ entries (O(n) selection; the same values as mergekit's sort); beyond, as in
    mergekit, quantiles of 10⁶ entries drawn with replacement (here from the engine's seeded generator,
    mergekit uses torch's global one: same statistics, different draws)."""
    other = tensors[0]
    p = torch.softmax(other, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > _FUSION_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (_FUSION_SAMPLE,), device=flat.device, generator=generator)]
    at = (torch.tensor(_FUSION_QUANTILES) * (flat.numel() - 1)).long().tolist()  # mergekit's float32 rounding
    q1, median, q3 = (torch.kthvalue(flat, i + 1).values for i in at)
    threshold = median + 1.5 * (q3 - q1)
    return base + (other - base) * (importance >= threshold).to(base.dtype)


@merge_method(base="input", max_models=1)
def passthrough(base: None, tensors: list[Tensor], *, scale: PerModel[float | None] = None) -> Tensor:
    """Passthrough: the one input's tensor, times ``scale`` if set — the method of frankenmerges
    (``slices:`` stacking layer ranges of several models)."""
    return tensors[0] if scale[0] is None else tensors[0] * scale[0]
