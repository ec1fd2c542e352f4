"""``slices:`` (frankenmerges) through the typed config and Hydra, and their bad inputs: each refused
before any tensor is read, nothing written. Equality with mergekit: tests/merge/test_new_methods.py."""
from __future__ import annotations

import json

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import MergeConfig, merge, plan
from fusionlab.merge.mergekit_yaml import load_mergekit_config

from .conftest import TINY, load_dir, tiny_state, write_model


def sliced(out, slices, method="passthrough", **kw):
    return MergeConfig.from_dict({"method": method, "output": str(out), "progress": False, "slices": slices, **kw})


def test_slices_through_hydra_run_and_stack(tmp_path, family, compose):
    from fusionlab.run import run

    slices = (f"[{{sources: [{{model: '{family['m0']}', layer_range: [0, 3]}}]}}, "
              f"{{sources: [{{model: '{family['m1']}', layer_range: [1, 2]}}]}}]")
    cfg = compose(["+experiment=merge", "merge_method=passthrough", f"merge.slices={slices}", "logger=none"])
    run(cfg)
    out = tmp_path / "run" / "merged"
    got, m0, m1 = load_dir(out), load_dir(family["m0"]), load_dir(family["m1"])
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"], m0["model.layers.2.self_attn.q_proj.weight"])
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"], m1["model.layers.1.self_attn.q_proj.weight"])
    assert "model.layers.4.self_attn.q_proj.weight" not in got
    assert torch.equal(got["model.norm.weight"], m1["model.norm.weight"])  # after the layers: the last slice's
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("case", ["outside", "unequal", "not_stacking", "base_not_a_source", "both", "empty"])
def test_bad_slices_are_refused_before_any_read(tmp_path, family, case):
    m0, m1, out = str(family["m0"]), str(family["m1"]), tmp_path / "out"
    if case == "outside":  # the tiny models have 3 layers (0..2): [2, 4] reaches layer 3
        with pytest.raises(FusionlabError, match=r"layer_range \[2, 4\] of model '.*m1' is outside its 3 layers"):
            plan(sliced(out, [{"sources": [{"model": m0, "layer_range": [0, 2]}]},
                              {"sources": [{"model": m1, "layer_range": [2, 4]}]}]))
    elif case == "unequal":
        with pytest.raises(FusionlabError, match=r"same number of layers.*\[\[0, 2\], \[0, 3\]\]"):
            sliced(out, [{"sources": [{"model": m0, "layer_range": [0, 2]}, {"model": m1, "layer_range": [0, 3]}]}],
                   method="linear")
    elif case == "not_stacking":  # a wider model's layers cannot follow a narrower model's
        wide_cfg = {**TINY, "hidden_size": 32, "intermediate_size": 48}
        wide = str(write_model(tmp_path / "wide", tiny_state(5, wide_cfg), wide_cfg))
        with pytest.raises(FusionlabError, match=r"(?s)slices do not stack.*model.layers.2.self_attn.q_proj.weight"):
            plan(sliced(out, [{"sources": [{"model": m0, "layer_range": [0, 2]}]},
                              {"sources": [{"model": wide, "layer_range": [0, 1]}]}]))
    elif case == "base_not_a_source":
        with pytest.raises(FusionlabError, match="base model .* is not one of its sources"):
            plan(sliced(out, [{"sources": [{"model": m0, "layer_range": [0, 2]}, {"model": m1, "layer_range": [0, 2],
                                                                                   "parameters": {"weight": 1.0}}]}],
                        method="ties", base=str(family["base"])))
    elif case == "both":
        with pytest.raises(FusionlabError, match="either merge.models .* or merge.slices"):
            sliced(out, [{"sources": [{"model": m0, "layer_range": [0, 2]}]}], models=[m1])
    else:
        with pytest.raises(FusionlabError, match=r"layer_range=\[\] .* must be \[start, stop\]"):
            sliced(out, [{"sources": [{"model": m0}]}])
    assert not out.exists()


def test_mergekit_yaml_keys_are_checked_before_any_checkpoint_is_opened(tmp_path):
    y = tmp_path / "mk.yml"
    missing = str(tmp_path / "does_not_exist")  # never opened: each config fails on its keys first
    for text, match in [
        (f"merge_method: passthrough\nslices: [{{sources: [{{model: {missing}, layer_range: [0, 2], weight: 1}}]}}]\n",
         r"Unknown mergekit option\(s\) \['weight'\] in .*slices\[0\].sources\[0\]"),
        (f"merge_method: linear\nmodels: [{{model: {missing}}}]\nmerge_methd: ties\n", r"\['merge_methd'\]"),
        (f"merge_method: linear\nslices: [{{sources: [{{model: {missing}, layer_range: [0, 1]}}], residual_weight: 0.1}}]\n",
         "'residual_weight'"),
        (f"merge_method: frankenmerge\nmodels: [{{model: {missing}}}]\n", "Unknown merge method 'frankenmerge'"),
        (f"merge_method: linear\nmodels: [{{model: {missing}}}]\nslices: [{{sources: []}}]\n", "exactly one of models or slices"),
        # malformed shapes: each named, never a TypeError / AttributeError / KeyError from inside
        ("", "is empty"),
        ("- a\n- b\n", r"must be a mapping, got \['a', 'b'\]"),
        (": : :\n", r"mk.yml', line 1, is not valid YAML"),
        ("merge_method: linear\nmodels: 3\n", "models must be a list"),
        ("merge_method: linear\nslices: 7\n", "slices must be a list"),
        ("merge_method: linear\nmodels: [{parameters: {weight: 1}}]\n", r"models\[0\] has no model"),
        (f"merge_method: linear\nmodels: [{{model: {missing}, parameters: 3}}]\n", r"models\[0\].parameters must be a mapping"),
        (f"merge_method: linear\nparameters: [1]\nmodels: [{{model: {missing}}}]\n", r"mk.yml: parameters must be a mapping"),
        ("merge_method: linear\nslices: [{sources: 3}]\n", r"slices\[0\].sources must be a list"),
        (f"merge_method: linear\nslices: [{{sources: [{{model: {missing}, layer_range: 5}}]}}]\n",
         r"sources\[0\].layer_range must be \[start, stop\] \(two integers\), got 5"),
    ]:
        y.write_text(text)
        with pytest.raises(FusionlabError, match=match):
            load_mergekit_config(y, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_slice_gradient_runs_over_the_slice(tmp_path, family):
    """Within a slice t = k / (n - 1) over its own layers (mergekit's ConfigReader), not over the whole model."""
    base, m0 = str(family["base"]), str(family["m0"])
    out = tmp_path / "out"
    merge(sliced(out, [{"sources": [{"model": base, "layer_range": [1, 3]},
                                    {"model": m0, "layer_range": [1, 3], "parameters": {"weight": [0.0, 1.0]}}]}],
                 method="task_arithmetic", base=base))
    got, b, m = load_dir(out), load_dir(family["base"]), load_dir(family["m0"])
    name = "model.layers.{}.mlp.up_proj.weight"
    torch.testing.assert_close(got[name.format(0)], b[name.format(1)], rtol=0, atol=0)  # t = 0 at the slice's start
    torch.testing.assert_close(got[name.format(1)], m[name.format(2)], rtol=1e-6, atol=1e-6)  # t = 1 at its end
