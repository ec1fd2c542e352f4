"""The streaming engine: sharded IO, parameters per tensor, dtype, and errors that write nothing."""
from __future__ import annotations

import json

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import MergeConfig, merge
from fusionlab.merge.io import INDEX_NAME, CheckpointReader
from fusionlab.merge.mergekit_yaml import load_mergekit_config

from .conftest import TINY, load_dir, tiny_state, write_model


def cfg(out, method="ties", base=None, models=(), **kw):
    return MergeConfig.from_dict({"method": method, "base": base, "output": str(out), "progress": False,
                                  "models": list(models), **kw})


def test_sharded_roundtrip(tmp_path, family):
    sd = tiny_state(7)
    src = write_model(tmp_path / "sharded", sd, shard_bytes=20_000)
    shards = sorted(p.name for p in src.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((src / INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(sd)
    assert load_dir(src).keys() == sd.keys() and all(torch.equal(load_dir(src)[k], sd[k]) for k in sd)
    # linear of a sharded model with itself, re-sharded differently: same tensors, config + tokenizer copied
    out = tmp_path / "out"
    merge(cfg(out, "linear", models=[{"model": str(src), "parameters": {"weight": 1.0}},
                                     {"model": str(family["base"]), "parameters": {"weight": 0.0}}], shard_size=10_000))
    got = load_dir(out)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    from safetensors.torch import load_file  # the files are valid for the reference reader too

    ref = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    assert ref.keys() == sd.keys() and all(torch.equal(ref[k], sd[k]) for k in sd)
    assert (out / INDEX_NAME).exists() and (out / "tokenizer_config.json").exists()
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    assert not list(tmp_path.glob(".out.*"))  # temp dir renamed away


def test_output_dtype_and_fp32_compute(tmp_path, family):
    out = tmp_path / "bf16"
    merge(cfg(out, "task_arithmetic", base=str(family["base"]), models=[str(family["m0"])],
              parameters={"weight": 1.0}, dtype="bfloat16"))
    r = CheckpointReader(out)
    assert set(r.dtype.values()) == {"BF16"}
    want = load_dir(family["m0"])["model.norm.weight"].to(torch.bfloat16)
    assert torch.equal(r.get("model.norm.weight", dtype=None), want)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_layer_gradient_and_filters(tmp_path, family):
    out = tmp_path / "grad"
    # weight of m0 goes 0 → 1 over the 3 layers; mlp tensors forced to 0.25; outside layers t = 0
    params = {"weight": [{"filter": "mlp", "value": 0.25}, {"value": [0.0, 1.0]}]}
    merge(cfg(out, "task_arithmetic", base=str(family["base"]), models=[{"model": str(family["m0"]), "parameters": params}]))
    got, b, m = load_dir(out), load_dir(family["base"]), load_dir(family["m0"])
    for name, w in [("model.layers.0.self_attn.q_proj.weight", 0.0), ("model.layers.1.self_attn.q_proj.weight", 0.5),
                    ("model.layers.2.self_attn.q_proj.weight", 1.0), ("model.layers.1.mlp.up_proj.weight", 0.25),
                    ("model.embed_tokens.weight", 0.0)]:
        torch.testing.assert_close(got[name], b[name] + w * (m[name] - b[name]), rtol=1e-6, atol=1e-6)


def _assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize("case", ["shape", "missing", "arch", "unknown_param", "required", "nan", "out_nan", "method"])
def test_errors_write_nothing(tmp_path, family, case):
    out = tmp_path / "out"
    base, m0 = str(family["base"]), str(family["m0"])
    models = [{"model": m0, "parameters": {"weight": 1.0}}]
    kw = {}
    if case == "shape":
        bad = tiny_state(1)
        bad["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 16)
        models = [{"model": str(write_model(tmp_path / "bad", bad)), "parameters": {"weight": 1.0}}]
        match = r"Shape mismatch for tensor 'model.layers.1.mlp.up_proj.weight'"
    elif case == "missing":
        bad = tiny_state(1)
        del bad["model.layers.2.self_attn.k_proj.weight"]
        models = [{"model": str(write_model(tmp_path / "bad", bad)), "parameters": {"weight": 1.0}}]
        match = r"'model.layers.2.self_attn.k_proj.weight' .*missing"
    elif case == "arch":
        p = write_model(tmp_path / "bad", tiny_state(1))
        c = json.loads((p / "config.json").read_text())
        (p / "config.json").write_text(json.dumps({**c, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}))
        models = [{"model": str(p), "parameters": {"weight": 1.0}}]
        match = "Architecture mismatch"
    elif case == "unknown_param":
        models = [{"model": m0, "parameters": {"weight": 1.0, "densty": 0.5}}]
        match = r"Unknown parameter\(s\) \['densty'\]"
    elif case == "required":
        models = [{"model": m0}]
        match = "Missing required merge parameter 'weight'"
    elif case == "nan":
        bad = tiny_state(1)
        bad["model.norm.weight"][3] = float("nan")
        models = [{"model": str(write_model(tmp_path / "bad", bad)), "parameters": {"weight": 1.0}}]
        match = r"'model.norm.weight' .*NaN or inf"
    elif case == "out_nan":
        kw = {"parameters": {"lambda": 1e38, "normalize": False}}
        models = [{"model": m0, "parameters": {"weight": 1e38}}]
        match = "produced NaN or inf"
    else:
        kw = {"method": "tie"}
        match = "Unknown merge method 'tie'"
    with pytest.raises(FusionlabError, match=match):
        merge(cfg(out, kw.pop("method", "ties"), base=base, models=models, **kw))
    _assert_nothing_written(out)


def test_plan_is_typed_and_reads_no_tensor(tmp_path, family):
    from fusionlab.merge import MergePlan, plan

    c = cfg(tmp_path / "out", "ties", base=str(family["base"]), parameters={"density": [0.2, 0.8], "normalize": False},
            models=[{"model": str(family["m0"]), "parameters": {"weight": 1}}, str(family["m1"])])
    with pytest.raises(FusionlabError, match=r"Missing required merge parameter 'weight' for model '.*m1'"):
        plan(c)
    c.parameters["weight"] = 0.5
    p = plan(c)
    assert isinstance(p, MergePlan) and [i.label for i in p.inputs][0].startswith("base model")
    assert not any(i.reader._mapped._maps for i in p.inputs)  # headers only: no file was mapped
    by_name = {t.name: t for t in p.tensors}
    t = by_name["model.layers.1.mlp.up_proj.weight"]
    assert t.shared["normalize"] is False and t.shared["tie_break"] == "mergekit"
    assert [m["weight"] for m in t.per_model] == [1.0, 0.5] and t.per_model[0]["density"] == pytest.approx(0.5)
    assert by_name["model.embed_tokens.weight"].per_model[1]["density"] == pytest.approx(0.2)  # t = 0 outside layers


def test_a_bad_value_in_a_filter_list_fails_at_plan_time(tmp_path, family):
    out = tmp_path / "out"
    params = {"rescale": True, "rescale_norm": [{"filter": "mlp", "value": "l3"}, {"value": "l1"}]}
    with pytest.raises(FusionlabError, match=r"'rescale_norm' = 'l3' .* must be one of .*at 9 tensors: 'model.layers.0.mlp"):
        merge(cfg(out, "ties", base=str(family["base"]), parameters=params,
                  models=[{"model": str(family["m0"]), "parameters": {"weight": 1.0}}]))
    _assert_nothing_written(out)
    # a shared parameter set for one model would be ignored: refused
    with pytest.raises(FusionlabError, match=r"\['rescale'\] of merge method 'ties' .* one value for all models"):
        cfg(out, "ties", base=str(family["base"]), models=[{"model": str(family["m0"]), "parameters": {"weight": 1.0,
                                                                                                     "rescale": True}}])


@pytest.mark.parametrize("method,switch", [("linear", "normalize"), ("multislerp", "normalize_weights")])
def test_weights_that_sum_to_zero_under_normalize_fail_at_plan_time(tmp_path, family, method, switch):
    """linear / multislerp divide by the weight sum: a zero sum was found only at the first output tensor (NaN)."""
    from fusionlab.merge import plan

    models = [{"model": str(family["m0"]), "parameters": {"weight": 1.0}},
              {"model": str(family["m1"]), "parameters": {"weight": -1.0}}]
    with pytest.raises(FusionlabError, match=rf"weights sum to 0 and {method} divides by their sum \({switch}=true\)"):
        plan(cfg(tmp_path / "out", method, models=models))
    _assert_nothing_written(tmp_path / "out")
    plan(cfg(tmp_path / "out", method, models=models, parameters={switch: False}))  # no division: planned


def test_existing_output_is_kept_unless_overwrite(tmp_path, family):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    kw = dict(base=str(family["base"]), models=[str(family["m0"])], parameters={"weight": 1.0})
    with pytest.raises((FileExistsError, FusionlabError), match="exists"):
        merge(cfg(out, "task_arithmetic", **kw))
    with pytest.raises(FusionlabError, match="not written by fusionlab"):  # a directory fusionlab did not write
        merge(cfg(out, "task_arithmetic", overwrite=True, **kw))
    assert (out / "keep.txt").exists()
    mine = tmp_path / "mine"
    merge(cfg(mine, "task_arithmetic", **kw))
    (mine / "stale.txt").write_text("x")
    merge(cfg(mine, "task_arithmetic", overwrite=True, **kw))  # our own output: replaced
    assert not (mine / "stale.txt").exists() and (mine / "model.safetensors").exists()


def test_tied_lm_head_uses_embedding(tmp_path, family):
    tied_cfg = {**TINY, "tie_word_embeddings": True}
    tied = write_model(tmp_path / "tied", tiny_state(3, tied_cfg), tied_cfg)
    out = tmp_path / "out"
    # base untied, model tied: the tied model's lm_head is its embedding
    merge(cfg(out, "linear", models=[{"model": str(family["base"]), "parameters": {"weight": 1.0}},
                                     {"model": str(tied), "parameters": {"weight": 1.0}}]))
    got, b, t = load_dir(out), load_dir(family["base"]), load_dir(tied)
    torch.testing.assert_close(got["lm_head.weight"], (b["lm_head.weight"] + t["model.embed_tokens.weight"]) / 2)


def test_mergekit_yaml_import(tmp_path, family):
    y = tmp_path / "ties.yml"
    y.write_text(f"""
merge_method: ties
base_model: {family['base']}
models:
  - model: {family['m0']}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {family['m1']}
    parameters: {{weight: 0.5, density: [0.2, 0.8]}}
parameters:
  normalize: true
dtype: float32
""")
    c = load_mergekit_config(y, tmp_path / "out", progress=False)
    assert c.method == "ties" and c.base == str(family["base"]) and len(c.models) == 2
    merge(c)
    assert (tmp_path / "out" / "model.safetensors").exists()
    y.write_text("merge_method: ties\nslices: [{sources: []}]\n")
    with pytest.raises(FusionlabError, match="slice has no sources"):
        load_mergekit_config(y, tmp_path / "out2")
    y.write_text("merge_method: ties\nmodules: {text: {}}\nmodels: [{model: x}]\n")
    with pytest.raises(FusionlabError, match="'modules'"):
        load_mergekit_config(y, tmp_path / "out2")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["ties", "sce", "breadcrumbs"])
def test_cuda_merge_matches_cpu(tmp_path, family, method):
    models = [{"model": str(family[f"m{k}"]), "parameters": {"weight": 1.0, "density": 0.5}} for k in range(3)]
    if method == "sce":
        models = [{"model": m["model"]} for m in models]
    for device in ("cpu", "cuda"):
        merge(cfg(tmp_path / device, method, base=str(family["base"]), models=models, device=device))
    a, b = load_dir(tmp_path / "cpu"), load_dir(tmp_path / "cuda")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_truncated_checkpoint_is_a_clear_error_and_writes_nothing(tmp_path, family):
    bad = write_model(tmp_path / "cut", tiny_state(1))
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(FusionlabError, match="truncated"):
        merge(cfg(out, "task_arithmetic", base=str(family["base"]), models=[str(bad)], parameters={"weight": 1.0}))
    assert not out.exists()


def test_mapped_reads_release_and_copy_on_write(tmp_path):
    """Reads are zero-copy views of the file; writes never reach the file; release() drops the pages."""
    sd = {"a.weight": torch.randn(3, 5), "b.weight": torch.randn(256, 1024), "c.bias": torch.randn(7)}
    src = write_model(tmp_path / "m", sd)
    before = (src / "model.safetensors").read_bytes()
    r = CheckpointReader(src)
    name = "b.weight"  # spans whole pages
    t = r.get(name)
    assert torch.equal(t, sd[name])
    t.add_(1.0)  # private mapping: this process only
    assert torch.equal(r.get(name), sd[name] + 1.0)  # another get sees it until release
    del t
    r.release(name)  # whole pages only (the two edge pages may be shared with other tensors)
    again = r.get(name)
    assert torch.equal(again[2:-2], sd[name][2:-2]) and not torch.equal(again, sd[name] + 1.0)
    assert (src / "model.safetensors").read_bytes() == before
    r.close()


def test_a_failing_merge_stops_its_threads(tmp_path, family):
    import threading

    sd = tiny_state(2)
    sd[sorted(sd)[-1]].view(-1)[0] = float("nan")
    bad = write_model(tmp_path / "nan", sd)
    with pytest.raises(FusionlabError, match="NaN"):
        merge(cfg(tmp_path / "out", "task_arithmetic", base=str(family["base"]), models=[str(bad)],
                  parameters={"weight": 1.0}))
    assert not [t for t in threading.enumerate() if t.name.startswith(("fusionlab-reader", "fusionlab-writer"))]
