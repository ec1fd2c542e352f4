"""mergekit's newer methods and YAML features, against the oracle: the installed mergekit (dev extras).

Each case runs one mergekit YAML through mergekit's ``run_merge`` and through fusionlab's engine on
tiny random Llamas (tests/merge/conftest.py) and compares every output tensor. ``torch.equal``
(bit-equal) for every case listed in ``EXACT``; arcee_fusion is bit-equal too while a tensor has at
most 10⁶ entries (above that both sample the quantiles at random, from different generators).
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from fusionlab.merge import merge
from fusionlab.merge.mergekit_yaml import load_mergekit_config

from .conftest import load_dir

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[dev]')")


def run_mergekit(config: dict, out) -> None:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(config), str(out),
              options=MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))


def both(tmp_path, name: str, config: dict):
    """(fusionlab's tensors, mergekit's tensors, fusionlab's output dir) for one mergekit YAML."""
    run_mergekit(config, tmp_path / f"mk_{name}")
    y = tmp_path / f"{name}.yml"
    y.write_text(yaml.safe_dump(config))
    merge(load_mergekit_config(y, tmp_path / f"fl_{name}", progress=False))
    return load_dir(tmp_path / f"fl_{name}"), load_dir(tmp_path / f"mk_{name}"), tmp_path / f"fl_{name}"


def cases(f) -> dict[str, dict]:
    base, m = str(f["base"]), [str(f[f"m{k}"]) for k in range(3)]
    w = lambda p, v: {"model": p, "parameters": {"weight": v}}  # noqa: E731
    return {
        "nuslerp": {"merge_method": "nuslerp", "models": [w(m[0], 1.0), w(m[1], 0.4)]},
        "nuslerp_base_rows": {"merge_method": "nuslerp", "base_model": base, "models": [w(m[0], 1.0), w(m[1], 0.4)],
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "nuslerp_base_cols": {"merge_method": "nuslerp", "base_model": base, "models": [w(m[0], 0.3), w(m[1], [0.2, 1])],
                              "parameters": {"nuslerp_flatten": False}},
        "multislerp": {"merge_method": "multislerp", "models": [w(m[0], 1.0), w(m[1], 0.5), w(m[2], 0.25)]},
        "multislerp_base": {"merge_method": "multislerp", "base_model": base,
                            "models": [w(m[0], 1.0), w(m[1], 0.5), w(m[2], 2.0)], "parameters": {"normalize_weights": False}},
        "karcher": {"merge_method": "karcher", "models": [{"model": p} for p in m]},
        "karcher_base": {"merge_method": "karcher", "base_model": base, "models": [{"model": m[0]}, {"model": m[1]}],
                         "parameters": {"max_iter": 3, "tol": 1e-7}},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": [{"model": m[0]}],
                     "parameters": {"t": [0.02, 0.2]}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": [{"model": m[0]}]},
        "passthrough_scale": {"merge_method": "passthrough", "models": [
            {"model": m[0], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": m[1], "layer_range": [1, 3], "parameters": {"scale": 0.9}}]},
            {"sources": [{"model": m[2], "layer_range": [2, 3]}]}]},
        "slices_ties": {"merge_method": "ties", "base_model": base, "parameters": {"density": [0.3, 0.9]}, "slices": [
            {"sources": [{"model": base, "layer_range": [0, 2]}, {"model": m[0], "layer_range": [0, 2],
                                                                   "parameters": {"weight": 1.0}},
                         {"model": m[1], "layer_range": [1, 3], "parameters": {"weight": 0.5}}]},
            {"sources": [{"model": base, "layer_range": [2, 3]}, {"model": m[2], "layer_range": [0, 1]}],
             "parameters": {"weight": 0.7, "density": 0.5}}]},
        "slices_linear_filter": {"merge_method": "linear", "slices": [
            {"sources": [{"model": m[0], "layer_range": [0, 3]}, {"model": m[1], "layer_range": [0, 3]}],
             "parameters": {"weight": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}]}}]},
        "bf16_compute": {"merge_method": "task_arithmetic", "base_model": base, "dtype": "bfloat16",
                         "out_dtype": "float32", "models": [w(m[0], 0.7), w(m[1], 0.6)]},
    }


EXACT = ["nuslerp", "nuslerp_base_rows", "nuslerp_base_cols", "multislerp", "multislerp_base", "karcher", "karcher_base",
         "nearswap", "arcee_fusion", "passthrough_scale", "frankenmerge", "slices_ties", "slices_linear_filter",
         "bf16_compute"]


@pytest.mark.parametrize("name", EXACT)
def test_bit_equal_to_mergekit(tmp_path, family, name):
    ours, theirs, _ = both(tmp_path, name, cases(family)[name])
    assert ours.keys() == theirs.keys()
    differ = [k for k in ours if ours[k].dtype != theirs[k].dtype or not torch.equal(ours[k], theirs[k])]
    assert not differ, f"{name}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def test_frankenmerge_renumbers_layers_loads_and_generates(tmp_path, family):
    from transformers import AutoModelForCausalLM

    ours, _, out = both(tmp_path, "frankenmerge", cases(family)["frankenmerge"])
    src = {k: load_dir(family[f"m{k}"]) for k in range(3)}
    # output layers 0,1 = m0's 0,1; 2,3 = m1's 1,2 scaled by 0.9; 4 = m2's 2
    for out_layer, (k, layer, scale) in enumerate([(0, 0, 1), (0, 1, 1), (1, 1, 0.9), (1, 2, 0.9), (2, 2, 1)]):
        name = f"model.layers.{{}}.mlp.down_proj.weight"
        want = src[k][name.format(layer)] * scale if scale != 1 else src[k][name.format(layer)]
        assert torch.equal(ours[name.format(out_layer)], want)
    assert torch.equal(ours["model.embed_tokens.weight"], src[0]["model.embed_tokens.weight"])  # first slice's
    assert torch.equal(ours["lm_head.weight"], src[2]["lm_head.weight"])  # last slice's
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 5 and len(model.model.layers) == 5
    gen = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)


GPU_EXACT = ["nearswap", "passthrough_scale", "frankenmerge"]  # elementwise IEEE ops only: the same bits on CUDA
GPU_CLOSE = ["nuslerp", "nuslerp_base_rows", "multislerp_base", "karcher", "slices_linear_filter"]  # reductions, sin/acos


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", GPU_EXACT + GPU_CLOSE + ["arcee_fusion"])
def test_cuda_merge_matches_cpu(tmp_path, family, name):
    y = tmp_path / f"{name}.yml"
    y.write_text(yaml.safe_dump(cases(family)[name]))
    for device in ("cpu", "cuda"):
        merge(load_mergekit_config(y, tmp_path / device, progress=False, device=device))
    cpu, cuda = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    for k in cpu:
        if name in GPU_EXACT:
            assert torch.equal(cpu[k], cuda[k]), k
        elif name in GPU_CLOSE:
            torch.testing.assert_close(cuda[k], cpu[k], rtol=1e-5, atol=1e-6)
        else:  # arcee_fusion: an importance within rounding of the threshold may flip its entry (base vs model)
            assert (cpu[k] != cuda[k]).float().mean() <= 1e-3, k
