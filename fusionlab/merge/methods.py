"""Merge methods: one plain function per method, registered in :data:`METHODS`.

Every function merges ONE tensor: it gets the base tensor (or ``None``), the other models'
tensors (fp32, same shape) and the resolved parameters, and returns the merged fp32 tensor.
Semantics and defaults follow mergekit 0.1.5 (``mergekit/merge_methods``), so a mergekit YAML
gives the same numbers here; fusionlab-only options are marked as such.

Speed: mergekit ranks magnitudes with a full ``argsort`` per delta (O(n log n) comparisons on
(value, index) pairs). :mod:`fusionlab.merge.exact` finds the same kept set in O(n) by
replaying only the partitions of torch's (unstable) sort that contain the cut, so equal
magnitudes at the cut are kept or dropped exactly as in mergekit (``tie_break: mergekit``, the
default). ``tie_break: index`` (fusionlab only) breaks those ties by position instead, as a stable
sort would: the same on every platform, where mergekit's choice depends on the C++ library
torch was built with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge.exact import population_variance, rank_range_mask, reference_prefix_mask

REQUIRED = "__required__"  # default of a parameter with no default (mergekit: required)
_COMBINE_CHUNK = 1 << 20  # entries per chunk of the sign election + weighted sum


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


# --------------------------------------------------------------------------- sparsification
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


def sign_consensus(deltas: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Mask of entries whose sign agrees with the elected sign (TIES); zeros never agree unless all are 0."""
    sign = deltas.sign()
    if method == "sum":
        majority = (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    elif method == "count":
        majority = (sign.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
    else:
        raise FusionlabError(f"Unknown consensus_method {method!r}; use sum or count.")
    return sign == majority


# --------------------------------------------------------------------------- methods
def linear(base, tensors, *, weight: list[float], normalize: bool = True):
    """Σ wᵢ θᵢ (/ Σ wᵢ). The base, if any, is just one more input (it was appended to ``tensors``)."""
    result = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weight):
        result.add_(t, alpha=w)
    if normalize:
        result.div_(sum(weight))
    return result


def _task_arithmetic_family(base, tensors, *, weight, density, sparsify=None, consensus=None,
                            normalize=False, rescale=False, lambda_=1.0, rescale_norm="l1",
                            gamma=None, epsilon=None, generator=None, int8_mask=False, tie_break="mergekit"):
    """mergekit's GeneralizedTaskArithmetic: sparsify each δᵢ, weight, (sign-elect), sum, normalise, scale."""
    norm = rescale_norm if rescale else None
    if not consensus:  # no sign election: accumulate in place, never stacking N deltas (same sums, same order)
        mixed = None
        for i, t in enumerate(tensors):
            d = _sparsify(t - base, i, sparsify, density, gamma, epsilon, norm, generator, tie_break)  # owns t - base
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
        kept = _sparsify(d, i, sparsify, density, gamma, epsilon, norm, generator, tie_break)
        if kept is not d:
            d.copy_(kept)
    w = torch.tensor(weight, dtype=deltas.dtype, device=deltas.device).reshape(-1, 1)
    deltas.view(len(tensors), -1).mul_(w)

    def elect_and_sum(d: torch.Tensor) -> torch.Tensor:
        mask = sign_consensus(d, consensus)
        mixed = (d * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
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


def _sparsify(d, i, sparsify, density, gamma, epsilon, norm, generator, tie_break="mergekit"):
    """Sparsify the engine's own delta ``d`` (masked in place where the method allows)."""
    if sparsify == "magnitude":
        return magnitude(d, density[i], norm, tie_break, inplace=True)
    if sparsify == "random":
        return bernoulli(d, density[i], norm, generator, inplace=True)
    if sparsify == "magnitude_outliers":
        return magnitude_outliers(d, density[i], gamma[i], norm, tie_break, inplace=True)
    if sparsify == "della":
        return della_magprune(d, density[i], epsilon[i], norm, generator)
    return d


def task_arithmetic(base, tensors, **p):
    """θ_base + λ Σ wᵢ δᵢ (chat vector = this with the chat model at weight = ratio)."""
    return _task_arithmetic_family(base, tensors, **p)


def ties(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="magnitude", consensus="sum", **p)


def dare_linear(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="random", **p)


def dare_ties(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="random", consensus="sum", **p)


def breadcrumbs(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="magnitude_outliers", **p)


def breadcrumbs_ties(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="magnitude_outliers", consensus="sum", **p)


def della(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="della", consensus="sum", **p)


def della_linear(base, tensors, **p):
    return _task_arithmetic_family(base, tensors, sparsify="della", **p)


def model_stock(base, tensors, *, filter_wise: bool = False):
    """Model Stock: interpolate base → average by t = N·cosθ / (1 + (N−1)·cosθ), cosθ = mean pairwise cosine of δ."""
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


def slerp(base, tensors, *, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8):
    """Spherical interpolation base → other over the flattened tensor; lerp when (anti)collinear."""
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    na, nb = torch.linalg.vector_norm(a), torch.linalg.vector_norm(b)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = ((a / na) * (b / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return ((1 - t) * a + t * b).reshape(base.shape)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    return (torch.sin((1 - t) * theta) / s * a + torch.sin(t * theta) / s * b).reshape(base.shape)


def sce(base, tensors, *, select_topk: float = 1.0, variant: str = "code", int8_mask: bool = False):
    """FuseChat SCE: Select by cross-model variance, Calculate η ∝ mean(δ²), Erase minority signs.

    variant="code" (default, = released code and mergekit): Φ = θ + Σ ηⱼ keepⱼ δⱼ / Σ ηⱼ keepⱼ.
    variant="paper" (eq. 9): Φ = θ + Σ ηⱼ keepⱼ δⱼ, no divisor.
    """
    n = len(tensors)
    tvs = torch.empty((n, *base.shape), dtype=base.dtype, device=base.device)
    for i, t in enumerate(tensors):
        torch.sub(t, base, out=tvs[i])
    if select_topk < 1:
        tvs.mul_(sce_select_mask(tvs, select_topk).unsqueeze(0))
    eta = tvs.square().reshape(n, -1).mean(dim=1)
    total = float(eta.sum())
    eta = (torch.ones_like(eta) / n if abs(total) < 1e-6 else eta / total).reshape(n, 1)
    if variant not in ("code", "paper"):
        raise FusionlabError(f"Unknown sce variant {variant!r}; use code (released code, default) or paper (eq. 9).")

    def erase_and_average(d: torch.Tensor) -> torch.Tensor:
        weights = eta * sign_consensus(d, "sum")
        merged = (d * weights).sum(dim=0)
        return merged / weights.sum(dim=0).clamp(min=1e-6) if variant == "code" else merged

    return _add_per_entry(base, tvs, erase_and_average)


def sce_select_mask(tvs: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction (of the non-zero-variance entries) by variance across models."""
    if density <= 0:
        return torch.zeros_like(tvs[0])
    if density >= 1:
        return torch.ones_like(tvs[0])
    var = population_variance(tvs)  # = torch.var(tvs, dim=0, unbiased=False), bit for bit
    k = int(int(torch.count_nonzero(var)) * density)
    if k == 0:
        return torch.zeros_like(var)
    return reference_prefix_mask(var.abs().reshape(-1), k, descending=True, kind="topk",
                                 overwrite=True).reshape(var.shape).to(var.dtype)


def varm(base, tensors):
    """FuseChat-v1 VaRM: per tensor, wⱼ ∝ mean((φⱼ − θ_pivot)²); result Σ wⱼ φⱼ (uniform if all equal the pivot)."""
    var = torch.stack([(t - base).square().mean() for t in tensors])
    total = var.sum()
    w = torch.full_like(var, 1 / len(tensors)) if total <= 0 else var / total
    result = torch.zeros_like(base)
    for t, wj in zip(tensors, w):
        result.add_(t * wj)
    return result


# --------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Method:
    """A merge function plus its parameters (name → default; ``REQUIRED`` if none), as in mergekit."""

    name: str
    fn: Callable[..., torch.Tensor]
    shared: dict[str, Any] = field(default_factory=dict)  # one value for all models (may vary per tensor)
    per_model: dict[str, Any] = field(default_factory=dict)  # one value per model (and per tensor)
    base: str = "required"  # required | input (the base is one more input, linear) | none
    min_models: int = 1  # non-base models
    max_models: int | None = None
    random: bool = False  # uses a seeded generator

    def params(self) -> set[str]:
        return set(self.shared) | set(self.per_model)


_GTA_SHARED = {"int8_mask": False, "lambda": 1.0, "rescale_norm": "l1"}


def _gta(name, fn, normalize, rescale, random=False, magnitude=False, **extra_per_model):
    extra = {"tie_break": "mergekit"} if magnitude else {}  # fusionlab only: mergekit (exact) | index (O(n))
    return Method(name, fn, shared={**_GTA_SHARED, "normalize": normalize, "rescale": rescale, **extra},
                  per_model={"weight": REQUIRED, "density": 1.0, **extra_per_model}, random=random)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("linear", linear, shared={"normalize": True}, per_model={"weight": REQUIRED}, base="input"),
    _gta("task_arithmetic", task_arithmetic, normalize=False, rescale=False),
    _gta("ties", ties, normalize=True, rescale=False, magnitude=True),
    _gta("dare_linear", dare_linear, normalize=False, rescale=True, random=True),
    _gta("dare_ties", dare_ties, normalize=False, rescale=True, random=True),
    _gta("breadcrumbs", breadcrumbs, normalize=False, rescale=False, magnitude=True, gamma=0.01),
    _gta("breadcrumbs_ties", breadcrumbs_ties, normalize=False, rescale=False, magnitude=True, gamma=0.01),
    _gta("della", della, normalize=True, rescale=True, random=True, epsilon=0.15),
    _gta("della_linear", della_linear, normalize=False, rescale=True, random=True, epsilon=0.15),
    Method("model_stock", model_stock, shared={"filter_wise": False}, min_models=2),
    Method("slerp", slerp, shared={"t": REQUIRED}, min_models=1, max_models=1),
    Method("sce", sce, shared={"select_topk": 1.0, "variant": "code", "int8_mask": False}),
    Method("varm", varm),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise FusionlabError(f"Unknown merge method {name!r}; use one of {sorted(METHODS)}.")
    return METHODS[name]


def apply_method(method: Method, base: torch.Tensor | None, tensors: list[torch.Tensor],
                 shared: dict[str, Any], per_model: list[dict[str, Any]],
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Call ``method.fn`` with resolved parameters (per-model values become lists)."""
    kwargs = {("lambda_" if k == "lambda" else k): v for k, v in shared.items()}
    for k in method.per_model:
        kwargs[k] = [float(p[k]) for p in per_model]
    if method.random:
        kwargs["generator"] = generator
    if method.fn in (linear,):
        return method.fn(None, tensors, **kwargs)
    return method.fn(base, tensors, **kwargs)


def is_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. One reduction; the exact elementwise check only when the sum is not finite."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


__all__ = ["METHODS", "Method", "REQUIRED", "apply_method", "get_method"]
