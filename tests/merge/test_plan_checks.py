"""Plan before work (mergekit #328): every problem of a whole config in ONE error, listing every
offending tensor, raised from the checkpoints' headers before a tensor is read or a byte written."""
from __future__ import annotations

import re

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import MergeConfig, merge

from .conftest import TINY, tiny_state, write_model


def test_all_problems_in_one_error(tmp_path, family):
    bad = tiny_state(1)
    del bad["model.layers.0.mlp.up_proj.weight"], bad["model.layers.2.self_attn.k_proj.weight"]
    bad["model.layers.1.mlp.down_proj.weight"] = torch.zeros(16, 8)  # shape
    bad["model.layers.2.input_layernorm.weight"] = torch.zeros(16, dtype=torch.int32)  # an integer where floats are
    bad_dir = write_model(tmp_path / "bad", bad)
    big_vocab = {**TINY, "vocab_size": 100}
    other = write_model(tmp_path / "vocab", tiny_state(2, big_vocab), big_vocab)
    out = tmp_path / "out"
    cfg = MergeConfig.from_dict({"method": "ties", "base": str(family["base"]), "output": str(out), "progress": False,
                                 "models": [{"model": str(bad_dir), "parameters": {"weight": 1.0}},
                                            {"model": str(other)}]})  # no weight for the second model
    with pytest.raises(FusionlabError) as err:
        merge(cfg)
    msg = str(err.value)
    assert msg.startswith("The merge has ") and "nothing was read or written" in msg
    for kind in ("missing tensors (1)", "shape mismatches (1)", "vocabulary mismatches (2)", "dtype mismatches (1)",
                 "parameter problems (1)"):
        assert kind in msg, kind
    missing = re.search(r"missing from model '.*bad'.* — at 2 tensors: (.*)", msg).group(1)
    assert missing == "'model.layers.0.mlp.up_proj.weight', 'model.layers.2.self_attn.k_proj.weight'"
    assert "'model.layers.1.mlp.down_proj.weight': base model" in msg and "[16, 32], model" in msg
    assert "Shape mismatch for tensor 'lm_head.weight'" in msg and "different vocabulary sizes" in msg
    # the one missing parameter is listed once, with every tensor it blocks (all but the problem tensors of `bad`)
    n_blocked = int(re.search(r"Missing required merge parameter 'weight' for model '.*vocab'.* — at (\d+) tensors",
                              msg).group(1))
    assert n_blocked == len(tiny_state(0)) - 2
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_a_clean_config_plans_without_opening_a_tensor(tmp_path, family):
    from fusionlab.merge import plan

    cfg = MergeConfig.from_dict({"method": "nuslerp", "output": str(tmp_path / "out"), "progress": False,
                                 "models": [{"model": str(family["m0"]), "parameters": {"weight": 1.0}},
                                            {"model": str(family["m1"]), "parameters": {"weight": [0.0, 1.0]}}]})
    p = plan(cfg)
    assert not any(i.reader._mapped._maps for i in p.inputs)  # headers only
    t = {tp.name: tp for tp in p.tensors}
    assert t["model.layers.2.mlp.up_proj.weight"].per_model[1]["weight"] == 1.0 and t["lm_head.weight"].base is None
    with pytest.raises(FusionlabError, match=r"'nuslerp' takes exactly 2 model\(s\) besides the base; got 3"):
        plan(MergeConfig.from_dict({**{"method": "nuslerp", "output": str(tmp_path / "o2")},
                                    "models": [str(family[f"m{k}"]) for k in range(3)], "parameters": {"weight": 1}}))
