"""Representation metrics on hidden states: one function per metric, exact, masked, in float64.

Two kinds of metric, after "Layer by Layer: Uncovering Hidden Representations in Language Models"
(Skean et al., ICML 2025, arXiv 2502.02013), of which Diff-eRank's matrix entropy is one member:

- **token level**: one text's token matrix Z (N tokens x d) gives one number (prompt entropy,
  curvature, nuclear norm). Batched over padded texts (B, T, d) with a mask (B, T) marking real
  tokens: padded positions are never read, whatever they hold (NaN included).
- **dataset level**: one vector per text, or several *views* of each text, give one number for the
  whole text set (dataset entropy, LiDAR, DiME, InfoNCE).

Normalisation (as Diff-eRank and Layer by Layer): a matrix is centred over its rows and every row
is scaled to unit length. :class:`Tokens` does this once per batch and caches the Gram spectrum,
so all token-level metrics of one forward pass share one eigendecomposition.

Speed and exactness: ZZ^T (N x N) and Z^TZ (d x d) have the same non-zero eigenvalues, so every
entropy-like metric takes the smaller one, with ``eigvalsh`` in float64; eigenvalues below the
solver's round-off are exact zeros (0 log 0 = 0), which is also why padding cannot change a value.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch

from fusionlab.errors import FusionlabError

F64 = torch.float64
NORMALIZATIONS = ("max_entropy", "log_n", "log_d", "raw")


def _eigvalsh(sym: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.eigvalsh``, single-threaded on CPU.

    LAPACK's threaded symmetric eigensolver is pathological on small, shared CPUs: measured on
    2 busy cores, a 200x200 float64 matrix took 2.6 s with 2 threads and 2.6 ms with 1.
    """
    return _single_threaded(torch.linalg.eigvalsh, sym)


def _eigh(sym: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _single_threaded(torch.linalg.eigh, sym)


def _single_threaded(fn, x):
    if x.device.type != "cpu" or torch.get_num_threads() == 1:
        return fn(x)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(x)
    finally:
        torch.set_num_threads(threads)


def _clamp_round_off(lam: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, last dim) below size * eps * largest are zeros that came out as +-1e-16."""
    noise = lam.shape[-1] * torch.finfo(F64).eps * lam[..., -1:].abs()
    return torch.where(lam > noise, lam, 0.0)


def gram_spectrum(z: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (ascending, round-off clamped to 0) of Z^T Z for a batch z (..., N, d), from the
    smaller of the N x N Gram Z Z^T and the d x d matrix Z^T Z (same non-zero spectrum)."""
    n, d = z.shape[-2:]
    gram = z @ z.transpose(-1, -2) if n <= d else z.transpose(-1, -2) @ z
    return _clamp_round_off(_eigvalsh(gram))


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not alpha > 0:
        raise FusionlabError(f"The entropy order alpha must be > 0, got {alpha!r} (alpha=1 is the Shannon/von "
                             "Neumann entropy of Diff-eRank; Layer by Layer also uses 2).")
    return alpha


def renyi_entropy(lam: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Matrix-based Renyi entropy of order alpha of a spectrum ``lam`` (last dim), normalised to sum 1.

    Layer by Layer, eq. of S_alpha: p = lam / sum(lam); alpha = 1: H = -sum p log p; otherwise
    H = log(sum p^alpha) / (1 - alpha). A spectrum summing to 0 gives NaN (callers say why).
    """
    alpha = _check_alpha(alpha)
    lam = lam.to(F64)
    total = lam.sum(-1, keepdim=True)
    p = lam / torch.where(total > 0, total, 1.0)
    if alpha == 1.0:
        h = -torch.special.xlogy(p, p).sum(-1)
    else:
        h = torch.log(torch.where(p > 0, p, 0.0).pow(alpha).sum(-1)) / (1.0 - alpha)
    return torch.where(total.squeeze(-1) > 0, h, torch.nan)


def entropy_scale(normalization: str, n, d: int):
    """The divisor of an entropy of an n x d matrix: Layer by Layer's normalisations
    (``max_entropy`` = log min(n, d), the largest possible value; ``log_n``; ``log_d``; ``raw`` = 1)."""
    if normalization not in NORMALIZATIONS:
        raise FusionlabError(f"Unknown entropy normalization {normalization!r}; use one of {NORMALIZATIONS}.")
    n = n.to(F64) if isinstance(n, torch.Tensor) else torch.tensor(float(n), dtype=F64)
    if normalization == "max_entropy":
        return torch.log(torch.clamp(n, max=float(d)))
    if normalization == "log_n":
        return torch.log(n)
    if normalization == "log_d":
        return torch.full_like(n, math.log(d))
    return torch.ones_like(n)


# --------------------------------------------------------------------------------------------
# Token level
# --------------------------------------------------------------------------------------------

class Tokens:
    """A padded batch of token matrices (B, T, d) prepared once for every token-level metric.

    ``z`` is float64 with padded rows exactly zero; with ``center`` each text's rows are centred
    over its real tokens, with ``unit`` scaled to unit length (Diff-eRank's and Layer by Layer's
    normalisation; zero rows stay zero). ``spectrum`` (cached) is the Gram spectrum of each text.
    """

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor | None = None, center: bool = True,
                 unit: bool = True):
        if hidden.dim() == 2:
            hidden = hidden.unsqueeze(0)
        if hidden.dim() != 3:
            raise FusionlabError("Token-level metrics expect hidden states of shape (batch, tokens, dim) or "
                                 f"(tokens, dim), got {tuple(hidden.shape)}.")
        b, t, d = hidden.shape
        mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if mask is None \
            else mask.to(hidden.device).bool().reshape(b, t)
        n = mask.sum(1)
        if bool((n < 2).any()):
            bad = (n < 2).nonzero().flatten().tolist()
            raise FusionlabError(f"Representation metrics need at least 2 tokens per text; text(s) {bad} of the "
                                 "batch have fewer.")
        m = mask.unsqueeze(-1)
        z = torch.where(m, hidden.to(F64), 0.0)
        finite = torch.isfinite(z).flatten(1).all(1)
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            raise FusionlabError(
                f"The representations of text(s) {bad} of the batch contain NaN or inf, so their metrics are "
                "undefined (the Diff-eRank reference silently counts them as 0). The model overflowed or its "
                "weights are broken: run it in float32 (model.dtype=float32) or check the checkpoint.")
        if center:
            z = torch.where(m, z - z.sum(1, keepdim=True) / n.view(b, 1, 1), 0.0)
        if unit:
            z = z / z.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(F64).tiny)
        self.z, self.mask, self.n, self.dim = z, mask, n, d

    @cached_property
    def spectrum(self) -> torch.Tensor:
        """Eigenvalues of Z^T Z per text (B, min(T, d)), ascending; padding adds only exact zeros."""
        return gram_spectrum(self.z)

    @cached_property
    def ordered(self) -> torch.Tensor:
        """``z`` with each text's real tokens first, in order (for metrics of the token sequence)."""
        if bool((self.mask[:, 1:] <= self.mask[:, :-1]).all()):  # right padding: already so
            return self.z
        order = torch.argsort((~self.mask).to(torch.int8), dim=1, stable=True)
        return torch.gather(self.z, 1, order.unsqueeze(-1).expand_as(self.z))


def _tokens(x: Tokens | torch.Tensor) -> Tokens:
    return x if isinstance(x, Tokens) else Tokens(x)


def prompt_entropy(tokens: Tokens | torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """Prompt entropy (Layer by Layer; Diff-eRank's matrix entropy at alpha = 1), per text (B,).

    Z = the normalised tokens of one text, K = Z Z^T; H = S_alpha(K / tr K) (:func:`renyi_entropy`).
    The effective rank is exp(H) at alpha = 1. A tensor argument is normalised as :class:`Tokens` does.
    """
    tokens = _tokens(tokens)
    h = renyi_entropy(tokens.spectrum, alpha)
    if bool(torch.isnan(h).any()):
        bad = torch.isnan(h).nonzero().flatten().tolist()
        raise FusionlabError(
            f"All token representations of text(s) {bad} of the batch are identical, so their entropy is undefined "
            "(a text repeating one token can do this); remove such texts from the text set.")
    return h


def matrix_entropy(rep: torch.Tensor, center: bool = True, alpha: float = 1.0) -> float:
    """Matrix entropy H of one representation matrix ``rep`` (N tokens x d), Diff-eRank's normalisation."""
    if rep.dim() != 2:
        raise FusionlabError(f"matrix_entropy expects a (tokens, dim) matrix, got shape {tuple(rep.shape)}.")
    return float(prompt_entropy(Tokens(rep, center=center), alpha)[0])


def erank(rep: torch.Tensor, center: bool = True) -> float:
    """Effective rank exp(H) of one representation matrix ``rep`` (N tokens x d) (Diff-eRank)."""
    return math.exp(matrix_entropy(rep, center=center))


def dataset_eranks(entropies: torch.Tensor) -> tuple[float, float]:
    """(geometric, arithmetic) dataset eRank from per-text entropies: exp(mean H) (the Diff-eRank
    reference) and mean exp(H)."""
    e = entropies.to(F64)
    return math.exp(float(e.mean())), float(e.exp().mean())


def curvature(tokens: Tokens | torch.Tensor, abs_cos: bool = False) -> torch.Tensor:
    """Average curvature of each text's token trajectory (B,), in radians.

    Hosseini & Fedorenko (NeurIPS 2023), as used by Layer by Layer: steps v_k = z_{k+1} - z_k,
    C = mean over k = 1..N-2 of arccos(v_{k+1} . v_k / (|v_{k+1}| |v_k|)), in [0, pi]. With
    ``abs_cos`` the cosine's absolute value is taken (the Layer-by-Layer code's variant, in [0, pi/2]).
    Pairs with a zero step are left out; a text with no pair (2 tokens) gives NaN.
    """
    tokens = _tokens(tokens)
    z, n = tokens.ordered, tokens.n
    if z.shape[1] < 3:
        return torch.full((z.shape[0],), torch.nan, dtype=F64, device=z.device)
    v = z[:, 1:] - z[:, :-1]
    norm = v.norm(dim=-1)
    den = norm[:, 1:] * norm[:, :-1]
    pair = torch.arange(den.shape[1], device=z.device)
    valid = (pair.unsqueeze(0) <= (n - 3).unsqueeze(1)) & (den > 0)
    cos = ((v[:, 1:] * v[:, :-1]).sum(-1) / torch.where(valid, den, 1.0)).clamp(-1.0, 1.0)
    angle = torch.arccos(cos.abs() if abs_cos else cos)
    count = valid.sum(1)
    total = torch.where(valid, angle, 0.0).sum(1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.nan)


def nuclear_norm(tokens: Tokens | torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Nuclear norm of each text's token matrix (B,); Matrix Nuclear-Norm (Li et al., arXiv 2410.10672).

    ``exact=False`` (the paper's approximation, no SVD): the sum of the min(N, d) largest column L2
    norms of Z (an L_{1,2} norm; exact for orthogonal columns, not a bound in general).
    ``exact=True``: ||Z||_* = sum of singular values = sum sqrt(eig(Z^T Z)), from the shared spectrum.
    The paper reports it divided by N (the suite does).
    """
    tokens = _tokens(tokens)
    if exact:
        return tokens.spectrum.clamp_min(0).sqrt().sum(-1)
    cols = tokens.z.norm(dim=1).sort(dim=-1, descending=True).values.cumsum(-1)  # padded rows are zero
    keep = torch.clamp(tokens.n, max=tokens.dim) - 1
    return cols.gather(1, keep.unsqueeze(1)).squeeze(1)


# --------------------------------------------------------------------------------------------
# Dataset level: one vector per text (or per view of a text)
# --------------------------------------------------------------------------------------------

def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None = None,
                view_masks: torch.Tensor | None = None) -> torch.Tensor:
    """Text embeddings (B, 1 + A, d): the mean of each text's unit-scaled token vectors over all its
    tokens (index 0) and over each of the A token subsets of ``view_masks`` (B, A, T).

    Unit-scaling before the mean keeps a few huge-norm tokens (attention sinks) from dominating.
    """
    b, t, _ = hidden.shape
    mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device) if mask is None else mask.bool()
    h = torch.where(mask.unsqueeze(-1), hidden.to(F64), 0.0)
    u = h / h.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(F64).tiny)
    sets = mask.unsqueeze(1)
    if view_masks is not None:
        sets = torch.cat([sets, view_masks.to(mask.device).bool() & mask.unsqueeze(1)], dim=1)
    weights = sets.to(F64)
    return torch.einsum("bat,btd->bad", weights, u) / weights.sum(-1, keepdim=True).clamp_min(1.0)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Centre the rows of x (..., d) over all leading dims (one mean for every row and view), then
    scale each row to unit length: the Diff-eRank normalisation applied to a set of embeddings."""
    x = x.to(F64)
    x = x - x.reshape(-1, x.shape[-1]).mean(0)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(F64).tiny)


def _embeddings(x: torch.Tensor, min_views: int, what: str, normalize: bool) -> torch.Tensor:
    """Check a (texts, dim) or (texts, views, dim) tensor and normalise it (:func:`normalize_rows`)."""
    if x.dim() != (3 if min_views else 2) or x.shape[0] < 2 or (min_views and x.shape[1] < min_views):
        shape = f"(texts, views, dim) with views >= {min_views}" if min_views else "(texts, dim)"
        raise FusionlabError(f"{what} needs embeddings of shape {shape} and at least 2 texts, "
                             f"got {tuple(x.shape)}.")
    if not bool(torch.isfinite(x).all()):
        raise FusionlabError(f"{what}: the text embeddings contain NaN or inf.")
    return normalize_rows(x) if normalize else x.to(F64)


def _entropy_or_error(lam: torch.Tensor, alpha: float, what: str) -> torch.Tensor:
    h = renyi_entropy(lam, alpha)
    if bool(torch.isnan(h).any()):
        raise FusionlabError(f"{what} is undefined: all text embeddings are identical (after centring they are "
                             "zero); use a text set of different texts.")
    return h


def dataset_entropy(embeddings: torch.Tensor, alpha: float = 1.0, normalize: bool = True) -> float:
    """Dataset entropy (Layer by Layer): S_alpha of the Gram matrix of the N text embeddings (N x d),
    normalised (centred over texts, unit rows) unless ``normalize=False``."""
    e = _embeddings(embeddings, 0, "dataset_entropy", normalize)
    return float(_entropy_or_error(gram_spectrum(e), alpha, "The dataset entropy"))


def lidar(views: torch.Tensor, alpha: float = 1.0, delta: float = 1e-4, normalize: bool = True) -> float:
    """LiDAR (Thilak et al., arXiv 2312.04000), the entropy form of Layer by Layer: views (N texts, A, d).

    Class means mu_i = mean_j x_ij, grand mean mu; S_b = (1/N) sum_i (mu_i - mu)(mu_i - mu)^T;
    S_w = (1/(N A)) sum_ij (x_ij - mu_i)(x_ij - mu_i)^T + delta I; M = S_w^{-1/2} S_b S_w^{-1/2};
    LiDAR = S_alpha(M / tr M). (The original reports exp of it, the effective rank.)
    Without forming d x d matrices when N A < d: S_w^{-1/2} = delta^{-1/2} I + V (diag((s + delta)^{-1/2})
    - delta^{-1/2}) V^T from the (N A) x (N A) Gram of the within-class deviations.
    """
    x = _embeddings(views, 2, "LiDAR", normalize)
    if not delta > 0:
        raise FusionlabError(f"LiDAR delta must be > 0 (it keeps S_w invertible), got {delta!r}.")
    n, a, d = x.shape
    means = x.mean(1)
    between = means - means.mean(0)  # (N, d)
    within = (x - means.unsqueeze(1)).reshape(n * a, d)
    if n * a < d:
        s, u = _eigh(within @ within.T / (n * a))
        keep = s > s.shape[-1] * torch.finfo(F64).eps * s[-1].abs()
        s, u = s[keep], u[:, keep]
        v = within.T @ u / torch.sqrt(n * a * s)  # eigenvectors of S_w with a non-zero eigenvalue
        y = between / math.sqrt(delta) + ((between @ v) * ((s + delta).rsqrt() - 1 / math.sqrt(delta))) @ v.T
    else:
        s, v = _eigh(within.T @ within / (n * a))
        y = ((between @ v) * (s.clamp_min(0) + delta).rsqrt()) @ v.T
    return float(_entropy_or_error(gram_spectrum(y / math.sqrt(n)), alpha, "LiDAR"))


def dime(views: torch.Tensor, alpha: float = 1.0, permutations: int = 10, seed: int = 0,
         normalize: bool = True) -> float:
    """DiME (Skean et al., arXiv 2301.08164): matrix-entropy difference between unpaired and paired views.

    Views A = views[:, 0], B = views[:, 1] (N texts x d); K_A = Z_A Z_A^T, K_B = Z_B Z_B^T (N x N);
    DiME = mean over ``permutations`` random permutations P of S_alpha(K_A o P K_B P^T) - S_alpha(K_A o K_B)
    (o = Hadamard product, each matrix trace-normalised). Always N x N: permuting samples is what
    it measures. The permutations are seeded (the reference's are not).
    """
    x = _embeddings(views, 2, "DiME", normalize)
    if int(permutations) < 1:
        raise FusionlabError(f"DiME needs permutations >= 1, got {permutations!r}.")
    ka, kb = x[:, 0] @ x[:, 0].T, x[:, 1] @ x[:, 1].T
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(x.shape[0], generator=g).to(x.device) for _ in range(int(permutations))]
    joint = torch.stack([ka * kb] + [ka * kb[p][:, p] for p in perms])
    h = _entropy_or_error(_clamp_round_off(_eigvalsh(joint)), alpha, "DiME")
    return float(h[1:].mean() - h[0])


def infonce(views: torch.Tensor, temperature: float = 0.1, normalize: bool = True) -> float:
    """InfoNCE loss between two views (van den Oord et al. 2018; Layer by Layer's form).

    L = mean_i CE(softmax_j(a_i . b_j / temperature), i) for A = views[:, 0], B = views[:, 1];
    log N - L is a lower bound on their mutual information (1 - L / log N normalised).
    """
    x = _embeddings(views, 2, "InfoNCE", normalize)
    if not temperature > 0:
        raise FusionlabError(f"InfoNCE temperature must be > 0, got {temperature!r}.")
    logits = x[:, 0] @ x[:, 1].T / float(temperature)
    return float((torch.logsumexp(logits, dim=1) - logits.diagonal()).mean())


__all__ = ["NORMALIZATIONS", "Tokens", "curvature", "dataset_entropy", "dataset_eranks", "dime", "entropy_scale",
           "erank", "gram_spectrum", "infonce", "lidar", "matrix_entropy", "normalize_rows", "nuclear_norm",
           "pool_tokens", "prompt_entropy", "renyi_entropy"]
