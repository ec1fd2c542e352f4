"""The metric math: each function against a float64 reference written here from the paper's formula
(1e-9 relative), hand-computed small matrices, invariances, padding, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.metrics.representation import (Tokens, curvature, dataset_entropy, dime, entropy_scale, infonce, lidar,
                                              nuclear_norm, pool_tokens, prompt_entropy, renyi_entropy)

F64 = torch.float64
REL = 1e-9


# ------------------------------------------------------------------ references, straight from the formulas

def ref_normalize(z: torch.Tensor) -> torch.Tensor:
    """Centre over rows (all leading dims), scale rows to unit length."""
    z = z.to(F64)
    flat = z.reshape(-1, z.shape[-1])
    z = z - flat.mean(0)
    return z / z.norm(dim=-1, keepdim=True)


def ref_entropy_of(z: torch.Tensor, alpha: float) -> float:
    """S_alpha(K / tr K), K = Z Z^T; its eigenvalues are the squared singular values of Z (an SVD, an
    independent path from the library's eigvalsh of the smaller Gram)."""
    lam = torch.linalg.svdvals(z.to(F64)) ** 2
    return ref_renyi(lam, alpha)


def ref_renyi(lam: torch.Tensor, alpha: float) -> float:
    p = lam[lam > 0] / lam[lam > 0].sum()
    if alpha == 1:
        return float(-(p * p.log()).sum())
    return float(torch.log((p ** alpha).sum()) / (1 - alpha))


def ref_curvature(z: torch.Tensor, abs_cos: bool = False) -> float:
    angles = []
    for k in range(1, z.shape[0] - 1):
        a, b = z[k + 1] - z[k], z[k] - z[k - 1]
        c = float(a @ b / (a.norm() * b.norm()))
        c = max(-1.0, min(1.0, abs(c) if abs_cos else c))
        angles.append(math.acos(c))
    return sum(angles) / len(angles)


def ref_lidar(x: torch.Tensor, alpha: float, delta: float) -> float:
    """Thilak et al.: explicit d x d scatter matrices and M = S_w^-1/2 S_b S_w^-1/2."""
    n, a, d = x.shape
    mu_i = x.mean(1)
    mu = mu_i.mean(0)
    s_b = sum(torch.outer(mu_i[i] - mu, mu_i[i] - mu) for i in range(n)) / n
    s_w = sum(torch.outer(x[i, j] - mu_i[i], x[i, j] - mu_i[i]) for i in range(n) for j in range(a)) / (n * a)
    s_w = s_w + delta * torch.eye(d, dtype=F64)
    e, v = torch.linalg.eigh(s_w)
    w = v @ torch.diag(e ** -0.5) @ v.T
    lam = torch.linalg.eigvalsh(w @ s_b @ w)
    return ref_renyi(lam.clamp_min(0), alpha)


def ref_dime(za: torch.Tensor, zb: torch.Tensor, alpha: float, perms: list[torch.Tensor]) -> float:
    ka, kb = za @ za.T, zb @ zb.T

    def h(k):
        return ref_renyi(torch.linalg.eigvalsh(k / torch.trace(k)).clamp_min(0), alpha)

    return sum(h(ka * kb[p][:, p]) for p in perms) / len(perms) - h(ka * kb)


def ref_infonce(za: torch.Tensor, zb: torch.Tensor, tau: float) -> float:
    losses = []
    for i in range(za.shape[0]):
        s = [math.exp(float(za[i] @ zb[j]) / tau) for j in range(zb.shape[0])]
        losses.append(-math.log(s[i] / sum(s)))
    return sum(losses) / len(losses)


def hidden_like(n: int, d: int, seed: int) -> torch.Tensor:
    """Correlated features with a shared offset (a non-trivial spectrum, like LLM hidden states)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64) @ torch.randn(d, d, generator=g, dtype=F64) \
        + 2.0 * torch.randn(1, d, generator=g, dtype=F64)


# ------------------------------------------------------------------ parity with the references

@pytest.mark.parametrize("n,d", [(40, 96), (150, 48), (64, 64)])
@pytest.mark.parametrize("alpha", [1.0, 2.0, 0.5])
def test_prompt_entropy_parity(n, d, alpha):
    rep = hidden_like(n, d, n + d)
    got = float(prompt_entropy(rep, alpha)[0])
    assert got == pytest.approx(ref_entropy_of(ref_normalize(rep), alpha), rel=REL)


@pytest.mark.parametrize("n,d", [(30, 80), (90, 20)])
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_dataset_entropy_parity(n, d, alpha):
    e = hidden_like(n, d, 3)
    assert dataset_entropy(e, alpha) == pytest.approx(ref_entropy_of(ref_normalize(e), alpha), rel=REL)


@pytest.mark.parametrize("abs_cos", [False, True])
def test_curvature_parity(abs_cos):
    rep = hidden_like(25, 16, 4)
    got = float(curvature(rep, abs_cos)[0])
    assert got == pytest.approx(ref_curvature(ref_normalize(rep), abs_cos), rel=REL)


def test_nuclear_norm_parity():
    for n, d in [(12, 30), (40, 9)]:
        rep = hidden_like(n, d, n)
        z = ref_normalize(rep)
        cols = sorted((float(z[:, j].norm()) for j in range(d)), reverse=True)
        assert float(nuclear_norm(rep)[0]) == pytest.approx(sum(cols[:min(n, d)]), rel=REL)
        assert float(nuclear_norm(rep, exact=True)[0]) == pytest.approx(float(torch.linalg.svdvals(z).sum()), rel=REL)


@pytest.mark.parametrize("n,a,d", [(6, 4, 40), (12, 5, 20)])  # N*A < d (Gram path) and N*A >= d (d x d path)
@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_lidar_parity(n, a, d, alpha):
    views = hidden_like(n * a, d, 5).reshape(n, a, d)
    want = ref_lidar(ref_normalize(views), alpha, 1e-4)
    assert lidar(views, alpha, delta=1e-4) == pytest.approx(want, rel=REL)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_dime_parity(alpha):
    n, d = 20, 12
    views = hidden_like(2 * n, d, 6).reshape(n, 2, d)
    z = ref_normalize(views)
    g = torch.Generator().manual_seed(7)  # the documented seeding: randperm(N) drawn in turn from one generator
    perms = [torch.randperm(n, generator=g) for _ in range(5)]
    want = ref_dime(z[:, 0], z[:, 1], alpha, perms)
    assert dime(views, alpha, permutations=5, seed=7) == pytest.approx(want, rel=REL)


def test_infonce_parity():
    views = hidden_like(30, 8, 8).reshape(15, 2, 8)
    z = ref_normalize(views)
    assert infonce(views, temperature=0.2) == pytest.approx(ref_infonce(z[:, 0], z[:, 1], 0.2), rel=REL)


# ------------------------------------------------------------------ hand-computed values

def test_identity_and_rank_one_entropies():
    n = 7
    for alpha in (1.0, 2.0, 0.5):
        raw = Tokens(torch.eye(n, 10, dtype=F64), center=False, unit=False)
        assert float(prompt_entropy(raw, alpha)[0]) == pytest.approx(math.log(n), rel=1e-12)  # K = I_N
        assert dataset_entropy(torch.eye(n, 10, dtype=F64), alpha, normalize=False) == pytest.approx(math.log(n))
        rank1 = torch.randn(9, 1, dtype=F64) * torch.randn(1, 5, dtype=F64)
        assert float(prompt_entropy(Tokens(rank1, center=False), alpha)[0]) == pytest.approx(0.0, abs=1e-12)
    # max_entropy scaling: K = I_N with N <= d has normalised entropy exactly 1
    assert math.log(n) / float(entropy_scale("max_entropy", n, 10)) == pytest.approx(1.0)
    # alpha -> 1 is continuous: H_1.001 close to H_1
    rep = hidden_like(30, 12, 1)
    h1, h1001 = float(prompt_entropy(rep, 1.0)[0]), float(prompt_entropy(rep, 1.001)[0])
    assert h1001 == pytest.approx(h1, rel=1e-3) and h1001 < h1  # Renyi entropy decreases with the order


def test_renyi_entropy_of_a_known_spectrum():
    lam = torch.tensor([0.0, 1.0, 1.0, 2.0], dtype=F64)  # p = (0, 1/4, 1/4, 1/2)
    assert float(renyi_entropy(lam, 1.0)) == pytest.approx(1.5 * math.log(2))
    assert float(renyi_entropy(lam, 2.0)) == pytest.approx(-math.log(1 / 16 + 1 / 16 + 1 / 4))


def test_curvature_of_simple_paths():
    u = torch.randn(6, dtype=F64)
    line = torch.arange(1, 8, dtype=F64).unsqueeze(1) * u  # z_k = k u
    raw = dict(center=False, unit=False)
    assert float(curvature(Tokens(line, **raw))[0]) == pytest.approx(0.0, abs=1e-7)
    e = torch.eye(2, dtype=F64)
    zigzag = torch.stack([torch.zeros(2, dtype=F64), e[0], e[0] + e[1], 2 * e[0] + e[1], 2 * e[0] + 2 * e[1]])
    assert float(curvature(Tokens(zigzag, **raw))[0]) == pytest.approx(math.pi / 2)
    back = torch.tensor([[0.0], [1.0], [0.0]], dtype=F64)  # a reversal
    assert float(curvature(Tokens(back, **raw))[0]) == pytest.approx(math.pi)
    assert float(curvature(Tokens(back, **raw), abs_cos=True)[0]) == pytest.approx(0.0)
    assert math.isnan(float(curvature(torch.randn(2, 4))[0]))  # 2 tokens: no pair of steps


def test_nuclear_norm_hand_values():
    raw = dict(center=False, unit=False)
    diag = torch.diag(torch.tensor([3.0, 4.0], dtype=F64))
    assert float(nuclear_norm(Tokens(diag, **raw))[0]) == pytest.approx(7.0)
    assert float(nuclear_norm(Tokens(diag, **raw), exact=True)[0]) == pytest.approx(7.0)
    q, _ = torch.linalg.qr(torch.randn(3, 2, dtype=F64))  # orthonormal columns: both give 2
    assert float(nuclear_norm(Tokens(q, **raw))[0]) == pytest.approx(2.0)
    assert float(nuclear_norm(Tokens(q, **raw), exact=True)[0]) == pytest.approx(2.0)
    one_row = Tokens(torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64), **raw)  # rank 1: sigma = sqrt 2
    assert float(nuclear_norm(one_row)[0]) == pytest.approx(2.0)  # two unit columns: not a bound in general
    assert float(nuclear_norm(one_row, exact=True)[0]) == pytest.approx(math.sqrt(2))


def test_lidar_dime_infonce_hand_values():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(8, 5, generator=g, dtype=F64)
    same = means.unsqueeze(1).repeat(1, 3, 1)  # identical views: S_w = delta I, so M = S_b / delta
    centred = means - means.mean(0)
    want = ref_renyi(torch.linalg.svdvals(centred) ** 2, 1.0)
    assert lidar(same, normalize=False) == pytest.approx(want, rel=1e-9)

    a = torch.nn.functional.normalize(torch.randn(6, 8, generator=g, dtype=F64), dim=1)
    for b in (torch.eye(6, 8, dtype=F64), torch.ones(6, 8, dtype=F64) / math.sqrt(8)):  # K_B = I, all-ones
        assert dime(torch.stack([a, b], 1), normalize=False) == pytest.approx(0.0, abs=1e-12)

    ortho = torch.eye(2, dtype=F64)
    assert infonce(torch.stack([ortho, ortho], 1), normalize=False) == pytest.approx(math.log1p(math.exp(-10)))
    equal = torch.ones(5, 2, 3, dtype=F64)
    assert infonce(equal, normalize=False) == pytest.approx(math.log(5))


# ------------------------------------------------------------------ invariances

def test_rotation_and_scaling_invariance():
    g = torch.Generator().manual_seed(2)
    rep = hidden_like(24, 16, 2)
    views = hidden_like(40, 16, 3).reshape(10, 4, 16)
    rot, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=F64))
    token_level = {"entropy": lambda x: prompt_entropy(x, 1.0), "entropy2": lambda x: prompt_entropy(x, 2.0),
                   "curvature": curvature, "nuclear_exact": lambda x: nuclear_norm(x, exact=True)}
    for name, fn in token_level.items():
        base = float(fn(rep)[0])
        assert float(fn(rep @ rot)[0]) == pytest.approx(base, rel=1e-9), name
        assert float(fn(3.7 * rep)[0]) == pytest.approx(base, rel=1e-9), name
    set_level = {"dataset_entropy": lambda v: dataset_entropy(v[:, 0]), "lidar": lidar, "dime": dime,
                 "infonce": infonce}
    for name, fn in set_level.items():
        base = fn(views)
        assert fn(views @ rot) == pytest.approx(base, rel=1e-8), name
        assert fn(0.01 * views) == pytest.approx(base, rel=1e-8), name
    # the column-norm approximation is not rotation-invariant, but it is invariant to permuting features
    perm = torch.randperm(16, generator=g)
    assert float(nuclear_norm(rep[:, perm])[0]) == pytest.approx(float(nuclear_norm(rep)[0]), rel=1e-12)
    # entropies do not depend on token order (curvature does, by design)
    order = torch.randperm(24, generator=g)
    assert float(prompt_entropy(rep[order])[0]) == pytest.approx(float(prompt_entropy(rep)[0]), rel=1e-10)


@pytest.mark.parametrize("d", [16, 200])  # padded batch through the covariance and through the Gram path
@pytest.mark.parametrize("left", [False, True])  # right padding, and left padding (tokens not at the start)
def test_padding_never_enters_any_token_metric(d, left):
    g = torch.Generator().manual_seed(d)
    lengths = [5, 37, 2, 20]
    reps = [torch.randn(n, d, generator=g) for n in lengths]
    t = max(lengths)
    batch = torch.full((4, t, d), float("nan"))  # garbage, even NaN, at padded positions
    mask = torch.zeros(4, t, dtype=torch.bool)
    views = torch.zeros(4, 3, t, dtype=torch.bool)
    for i, r in enumerate(reps):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        batch[i, sl], mask[i, sl] = r, True
        views[i, :, sl] = torch.rand(3, len(r), generator=g) < 0.5
    tokens = Tokens(batch, mask)
    checks = {"entropy": lambda x: prompt_entropy(x, 1.0), "entropy_a2": lambda x: prompt_entropy(x, 2.0),
              "curvature": curvature, "nuclear": nuclear_norm, "nuclear_exact": lambda x: nuclear_norm(x, exact=True)}
    for name, fn in checks.items():
        want = torch.stack([fn(Tokens(r))[0] for r in reps])
        torch.testing.assert_close(fn(tokens), want, rtol=1e-10, atol=0, equal_nan=True, msg=name)
    pooled = pool_tokens(batch, mask, views)
    for i, r in enumerate(reps):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        single = pool_tokens(r.unsqueeze(0), None, views[i:i + 1, :, sl])
        torch.testing.assert_close(pooled[i], single[0], rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ bad input

def test_bad_input_is_named():
    rep = torch.randn(6, 4)
    with pytest.raises(FusionlabError, match=r"alpha must be > 0, got 0\.0"):
        prompt_entropy(rep, 0.0)
    with pytest.raises(FusionlabError, match="alpha must be > 0"):
        dataset_entropy(rep, -1.0)
    with pytest.raises(FusionlabError, match="normalization 'bits'"):
        entropy_scale("bits", 5, 4)
    with pytest.raises(FusionlabError, match="at least 2 tokens"):
        curvature(torch.randn(1, 4))
    with pytest.raises(FusionlabError, match=r"\(texts, views, dim\)"):
        lidar(torch.randn(5, 4))
    with pytest.raises(FusionlabError, match="at least 2 texts"):
        infonce(torch.randn(1, 2, 4))
    with pytest.raises(FusionlabError, match="delta must be > 0"):
        lidar(torch.randn(5, 3, 4), delta=0.0)
    with pytest.raises(FusionlabError, match="identical"):
        dataset_entropy(torch.ones(5, 4))
    with pytest.raises(FusionlabError, match="identical"):
        prompt_entropy(torch.ones(5, 4))
    with pytest.raises(FusionlabError, match="NaN"):
        Tokens(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
