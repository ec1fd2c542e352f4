"""Same YAML, same inputs: fusionlab's output equals mergekit 0.1.5's (skipped when mergekit is absent).

mergekit is an optional test dependency (``pip install mergekit==0.1.5 torch==2.13.0``; it installs
beside our pins). The benchmark ``experiments/merge/bench_vs_mergekit.py`` does the same on
SmolLM2-sized models.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from fusionlab.merge import merge
from fusionlab.merge.mergekit_yaml import load_mergekit_config

from .conftest import load_dir, tiny_state, write_model

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed (pip install mergekit==0.1.5 torch==2.13.0)")


def run_mergekit(config: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


@pytest.fixture(scope="module")
def tie_family(tmp_path_factory):
    """Deltas on a coarse grid (like a few Adam steps): many equal magnitudes at the density cut."""
    root = tmp_path_factory.mktemp("tie_family")
    base = tiny_state(0)
    out = {"base": write_model(root / "base", base)}
    for k in range(3):
        g = torch.Generator().manual_seed(200 + k)
        out[f"m{k}"] = write_model(root / f"m{k}", {n: t + 0.125 * torch.randint(-3, 4, t.shape, generator=g)
                                                     for n, t in base.items()})
    return out


def configs(f):
    m = [str(f[f"m{k}"]) for k in range(3)]
    dens = [(1.0, 0.5), (0.3, 0.7), (0.5, 0.2)]
    return {
        "linear": {"models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, [1, 2, 0.5])]},
        "task_arithmetic": {"base_model": str(f["base"]), "parameters": {"lambda": 0.7},
                            "models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(m, [1, 0.3, 0.5])]},
        "ties": {"base_model": str(f["base"]),
                 "models": [{"model": p, "parameters": {"weight": w, "density": d}} for p, (w, d) in zip(m, dens)]},
        "breadcrumbs": {"base_model": str(f["base"]), "models": [
            {"model": p, "parameters": {"weight": w, "density": d, "gamma": 0.05}} for p, (w, d) in zip(m, dens)]},
        "ties_int8_mask": {"merge_method": "ties", "base_model": str(f["base"]), "parameters": {"int8_mask": True},
                           "models": [{"model": p, "parameters": {"weight": w, "density": d}} for p, (w, d) in zip(m, dens)]},
        "sce": {"base_model": str(f["base"]), "parameters": {"select_topk": 0.3}, "models": [{"model": p} for p in m]},
        "model_stock": {"base_model": str(f["base"]), "models": [{"model": p} for p in m]},
        "slerp": {"base_model": str(f["base"]), "parameters": {"t": [0, 0.3, 1]},
                  "models": [{"model": str(f["base"])}, {"model": m[0]}]},
    }


def max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp(min=1e-12)) for k in a)


@pytest.mark.parametrize("which", ["family", "tie_family"])
def test_same_output_as_mergekit(tmp_path, request, which):
    f = request.getfixturevalue(which)
    for method, body in configs(f).items():
        config = {"merge_method": method, "dtype": "float32", **body}
        run_mergekit(config, tmp_path / f"mk_{method}")
        y = tmp_path / f"{method}.yml"
        y.write_text(yaml.safe_dump(config))
        merge(load_mergekit_config(y, tmp_path / f"fl_{method}", progress=False))
        ours, theirs = load_dir(tmp_path / f"fl_{method}"), load_dir(tmp_path / f"mk_{method}")
        assert max_rel_diff(ours, theirs) <= 1e-6, method
