"""Every merge method against hand-computed tensors, plus the properties the issue lists."""
from __future__ import annotations

import math
from typing import Literal

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import methods as M
from fusionlab.merge import params as P
from fusionlab.merge.registry import METHODS, PerModel, get_method, merge_method

T = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731


def run(name, base, tensors, shared=None, per_model=None, seed=0):
    """One tensor through the engine's own path: resolve (defaults, type checks), then Method.apply."""
    m = get_method(name)
    shared = P.resolve([p for p in m.parameters if not p.per_model], [shared], "w", 0.0, name)
    per_model = [P.resolve([p for p in m.parameters if p.per_model], [pm], "w", 0.0, name)
                 for pm in (per_model or [{} for _ in tensors])]
    gen = torch.Generator().manual_seed(seed)
    return m.apply(base, tensors, shared, per_model, gen)


def close(a, b, tol=1e-6):
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


# ------------------------------------------------------------------ hand-computed values
def test_linear():
    close(run("linear", None, [T(1, 2), T(3, 6)], per_model=[{"weight": 1}, {"weight": 3}]), T(2.5, 5))
    close(run("linear", None, [T(1, 2), T(3, 6)], {"normalize": False}, [{"weight": 1}, {"weight": 3}]), T(10, 20))


def test_task_arithmetic():
    out = run("task_arithmetic", T(1, 1), [T(2, 0), T(1, 3)], {"lambda": 2.0}, [{"weight": 1}, {"weight": 0.5}])
    close(out, T(3, 1))  # δ = (1,-1), (0,2); Σwδ = (1,0); λ=2 → (2,0)


def test_ties():
    # δ1 top-2 = (3,0,0,-2), δ2·0.5 top-2 = (0,-1,0,2); elected signs (+,-,+,+)
    out = run("ties", torch.zeros(4), [T(3, -1, 0.5, -2), T(-1, -2, 1, 4)],
              per_model=[{"weight": 1, "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    close(out, T(3, -2, 0, 4))  # divided by Σ w·mask = (1, .5, 1, .5)
    out = run("ties", torch.zeros(4), [T(3, -1, 0.5, -2), T(-1, -2, 1, 4)], {"normalize": False},
              per_model=[{"weight": 1, "density": 0.5}, {"weight": 0.5, "density": 0.5}])
    close(out, T(3, -1, 0, 2))


def test_breadcrumbs():
    # n=10, keep 5, drop top 1 → ascending ranks 4..8
    out = run("breadcrumbs", torch.zeros(10), [torch.arange(1.0, 11)], per_model=[{"weight": 1, "density": 0.5, "gamma": 0.1}])
    close(out, T(0, 0, 0, 0, 5, 6, 7, 8, 9, 0))


def test_breadcrumbs_ties():
    out = run("breadcrumbs_ties", torch.zeros(4), [T(1, 2, 3, 4), T(-4, -3, 2, 1)],
              per_model=[{"weight": 1, "density": 0.5, "gamma": 0.25}] * 2)
    # δ1 keeps ranks 1,2 → (0,2,3,0); δ2 |.| = 4,3,2,1 keeps ranks 1,2 → (0,-3,2,0); sum (0,-1,5,0) → signs (+,-,+,+)
    close(out, T(0, -3, 5, 0))


def test_dare_inverse_density_and_l1():
    delta = torch.linspace(-1, 1, 1000)
    out = run("dare_linear", torch.zeros(1000), [delta], {"rescale_norm": "inverse_density"},
              [{"weight": 1, "density": 0.3}])
    kept = out != 0
    close(out[kept], delta[kept] / 0.3, 1e-5)
    assert 0.2 < kept.float().mean() < 0.4
    out = run("dare_linear", torch.zeros(1000), [delta], per_model=[{"weight": 1, "density": 0.3}])  # mergekit: L1
    assert math.isclose(float(out.abs().sum()), float(delta.abs().sum()), rel_tol=1e-5)


def test_della_keep_rate_and_rescale():
    delta = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    out = run("della_linear", torch.zeros_like(delta), [delta], per_model=[{"weight": 1, "density": 0.4, "epsilon": 0.1}])
    keep = (out != 0).float()
    assert 0.37 < float(keep.mean()) < 0.43
    # larger magnitudes are kept more often
    big = delta.abs() > delta.abs().median()
    assert keep[big].mean() > keep[~big].mean() + 0.05
    assert math.isclose(float(out.abs().sum()), float(delta.abs().sum()), rel_tol=1e-4)
    with pytest.raises(FusionlabError, match="epsilon"):
        run("della", torch.zeros(4), [T(1, 2, 3, 4)], per_model=[{"weight": 1, "density": 0.1, "epsilon": 0.2}])


def test_model_stock():
    close(run("model_stock", T(0, 0), [T(1, 0), T(0, 1)]), T(0, 0))  # orthogonal: t = 0
    close(run("model_stock", T(0, 0), [T(1, 0), T(1, 0)]), T(1, 0))  # parallel: t = 1
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(run("model_stock", T(0, 0), [T(1, 1), T(1, 0)]), T(t, 0.5 * t))


def test_slerp():
    close(run("slerp", T(1, 0), [T(0, 1)], {"t": 0.5}), T(c := 1 / math.sqrt(2), c))
    close(run("slerp", T(1, 0), [T(2, 0)], {"t": 0.5}), T(1.5, 0))  # collinear → lerp
    close(run("slerp", T(1, 0), [T(0, 1)], {"t": 0.0}), T(1, 0))


def test_sce_code_and_paper():
    base, a, b = torch.zeros(3), T(2, -1, 1), T(1, 1, -3)
    # erase keeps a at 0, b everywhere; η = (2, 11/3) / (17/3)
    close(run("sce", base, [a, b]), T(23 / 17, 1, -3))
    close(run("sce", base, [a, b], {"variant": "paper"}), T(23 / 17, 11 / 17, -33 / 17))
    # select_topk: variances (.25, 1, 4) → keep the top 2 → a=(0,-1,1), b=(0,1,-3)
    close(run("sce", base, [a, b], {"select_topk": 0.67}), T(0, 1, -3))


def test_varm():
    close(run("varm", T(0, 0), [T(1, 1), T(2, 0)]), T(5 / 3, 1 / 3))  # w ∝ (1, 2)
    close(run("varm", T(1, 1), [T(1, 1), T(1, 1)]), T(1, 1))  # no variation → uniform


# ------------------------------------------------------------------ properties
def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_linear_of_identical_models_is_that_model():
    x = rand(8, 5)
    close(run("linear", None, [x, x.clone(), x.clone()], per_model=[{"weight": 0.2}, {"weight": 1}, {"weight": 3}]), x)


def test_task_arithmetic_lambda_zero_is_base():
    base = rand(8, 5)
    out = run("task_arithmetic", base, [rand(8, 5, seed=1), rand(8, 5, seed=2)], {"lambda": 0.0},
              [{"weight": 1}, {"weight": 2}])
    assert torch.equal(out, base)


def test_ties_density_one_single_model_is_task_arithmetic():
    base, m = rand(16, 8), rand(16, 8, seed=3)
    a = run("ties", base, [m], per_model=[{"weight": 1, "density": 1.0}])
    b = run("task_arithmetic", base, [m], per_model=[{"weight": 1}])
    close(a, b)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_density_one_deterministic_and_seeded(name):
    base, ms = rand(16, 8), [rand(16, 8, seed=4), rand(16, 8, seed=5)]
    pm = [{"weight": 1, "density": 1.0}, {"weight": 0.5, "density": 1.0}]
    assert torch.equal(run(name, base, ms, per_model=pm, seed=1), run(name, base, ms, per_model=pm, seed=2))
    pm = [{"weight": 1, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    assert torch.equal(run(name, base, ms, per_model=pm, seed=1), run(name, base, ms, per_model=pm, seed=1))
    assert not torch.equal(run(name, base, ms, per_model=pm, seed=1), run(name, base, ms, per_model=pm, seed=2))


def test_every_method_has_a_yaml_stating_only_what_differs():
    """conf/merge_method/<name>.yaml names the method; a parameter it sets is the method's and differs
    from the signature's default (each default is written once, in the signature)."""
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[2] / "conf" / "merge_method"
    assert {p.stem for p in conf.glob("*.yaml")} >= set(METHODS)
    for path in sorted(conf.glob("*.yaml")):  # <method>.yaml, or a named setting of one (sce_fusechat.yaml)
        y = yaml.safe_load(path.read_text())
        name = y["method"]
        assert name == path.stem or path.stem.startswith(f"{name}_"), path.name
        m = METHODS[name]
        defaults = {**m.shared, **m.per_model}
        for k, v in (y.get("parameters") or {}).items():
            assert k in defaults and v != defaults[k], (name, k)


def test_parameters_are_read_from_the_signature():
    @merge_method(name="_test_scaled_mean", min_models=2)
    def scaled(base, tensors, *, weight: PerModel[float], gain: PerModel[float] = 2.0, lambda_: float = 1.0,
               mode: Literal["a", "b"] = "a", generator: torch.Generator | None = None):
        """Test method."""
        return base + lambda_ * sum(w * g * (t - base) for t, w, g in zip(tensors, weight, gain))

    try:
        m = METHODS["_test_scaled_mean"]
        assert m.shared == {"lambda": 1.0, "mode": "a"} and list(m.per_model) == ["weight", "gain"]
        assert m.per_model["gain"] == 2.0 and next(p for p in m.parameters if p.name == "weight").required
        assert m.random and m.min_models == 2 and m.summary == "Test method."
        out = run("_test_scaled_mean", T(1, 1), [T(2, 1), T(1, 3)], {"lambda": 0.5}, [{"weight": 1}, {"weight": 1, "gain": 1}])
        close(out, T(2, 2))  # 1 + 0.5 (2·(1,0) + 1·(0,2))
        with pytest.raises(FusionlabError, match=r"'mode' = 'c' .* must be one of \['a', 'b'\]"):
            m.check_names({"mode": "c"}, "merge.parameters")
        with pytest.raises(FusionlabError, match=r"Unknown parameter\(s\) \['lamda'\]"):
            m.check_names({"lamda": 1}, "merge.parameters")
        with pytest.raises(FusionlabError, match="Missing required merge parameter 'weight'"):
            run("_test_scaled_mean", T(1), [T(2), T(3)])
    finally:
        METHODS.pop("_test_scaled_mean", None)
    with pytest.raises(TypeError, match="keyword-only"):
        merge_method(lambda base, tensors, t=1.0: base, name="_test_bad")
    with pytest.raises(TypeError, match="registered twice"):
        merge_method(M.ties)
    assert "_test_bad" not in METHODS


def test_parameter_values_are_typed():
    ties = get_method("ties")
    for settings, match in [({"normalize": "yes"}, "true or false"), ({"rescale_norm": "l3"}, "one of"),
                            ({"tie_break": "random"}, "one of"), ({"lambda": "big"}, "a finite number")]:
        with pytest.raises(FusionlabError, match=match):
            ties.check_names(settings, "merge.parameters")
    # parameters a method does not honour are refused, not ignored (mergekit accepts and ignores these)
    with pytest.raises(FusionlabError, match=r"\['density', 'int8_mask'\] for merge method 'task_arithmetic'"):
        get_method("task_arithmetic").check_names({"density": 0.5, "int8_mask": True}, "merge.parameters")


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della", "sce"])
def test_int8_mask_is_honoured_and_changes_no_number(name):
    """mergekit's int8_mask keeps the sign (and SCE selection) masks in int8: less memory, same result."""
    base, ms = rand(64, 33), [rand(64, 33, seed=6), rand(64, 33, seed=7), rand(64, 33, seed=8)]
    pm = [{} for _ in ms] if name == "sce" else [{"weight": 1, "density": 0.5}, {"weight": 0.7, "density": 0.6},
                                                  {"weight": 0.2, "density": 0.5}]
    shared = {"select_topk": 0.4} if name == "sce" else {}
    plain = run(name, base, ms, {**shared, "int8_mask": False}, pm)
    assert torch.equal(run(name, base, ms, {**shared, "int8_mask": True}, pm), plain)
    d = torch.stack(ms) - base
    assert torch.equal(M.sign_consensus(d, "sum", torch.int8), M.sign_consensus(d, "sum"))
    assert torch.equal(M.sce_select_mask(d, 0.4, torch.int8), M.sce_select_mask(d, 0.4).to(torch.int8))


def test_index_tie_break_is_a_stable_sort_and_differs_only_at_the_cut():
    """tie_break=index keeps exactly a STABLE sort's entries (ties by position) in O(n)."""
    g = torch.Generator().manual_seed(3)
    for n, levels in [(50, 3), (1000, 7), (4097, 50)]:
        d = (torch.randint(-levels, levels + 1, (n,), generator=g) * 0.125).float()
        w = d.abs()
        for density in (0.1, 0.5, 0.9):
            k = max(1, int(density * n))
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.argsort(w, descending=True, stable=True)[:k]] = True
            got = M.magnitude(d, density, tie_break="index") != 0
            assert torch.equal(got, want & (d != 0))
            exact = M.magnitude(d, density) != 0  # mergekit's (unstable) choice: same count, same values outside the cut
            cut = torch.kthvalue(w, n - k + 1).values
            assert torch.equal(got[w != cut], exact[w != cut])
            n_top, target = int(0.05 * n), int(density * n)
            n_bot = max(0, n - target - n_top)
            want = torch.zeros(n, dtype=torch.bool)
            want[torch.sort(w, stable=True).indices[n_bot:n_bot + target]] = True
            got = M.magnitude_outliers(d, density, gamma=0.05, tie_break="index") != 0
            assert torch.equal(got, want & (d != 0))
    with pytest.raises(FusionlabError, match="tie_break 'random'"):
        M.magnitude(torch.randn(10), 0.5, tie_break="random")
