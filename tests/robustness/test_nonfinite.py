"""Non-finite values (NaN, inf) everywhere a user can put them: every float option of every experiment, numbers in
lists and untyped nodes (merge parameters, _target_ nodes), and model weights given to every job that reads them.
Each is refused in one paragraph naming the value (the key, or the model and tensor), before work where possible:
config values while composing, weights at load (one reduction per tensor), logits at the step they appear.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from omegaconf import OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.schema import NON_FINITE, validate
from tests.conftest import TINY_DIMS
from tests.robustness.test_inputs_fuzz import (EXPERIMENTS, _compose, _leaves, _refusal, _without_hydra,
                                               fusionlab_run)

NON_FINITE_VALUES = (float("nan"), float("inf"), float("-inf"))


# ---------------------------------------------------------------------------------------------- config values

@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_float_option_refuses_nan_and_inf(tmp_path, experiment):
    """NaN passes every range check written ``if x < low: raise`` and inf every one without an upper bound
    (align_method.threshold, chat_vector.ratio, metric.alpha, distill.temperature ... were accepted)."""
    cfg = _without_hydra(_compose([f"+experiment={experiment}"], tmp_path))
    floats = [key for key, value, _ in _leaves(validate(cfg)) if isinstance(value, float)]
    accepted, unnamed = [], []
    for key in dict.fromkeys(floats):
        for bad in NON_FINITE_VALUES:
            message = _refusal(cfg, key, bad)
            if message is None:
                accepted.append(f"{key}={bad}")
            elif f"{key}={bad}" not in message or "\n" in message:
                unnamed.append(message)
    assert floats, "the experiment has float options"
    assert not accepted, f"accepted silently: {accepted}"
    assert not unnamed, f"refused without naming key and value: {unnamed[:3]}"


# Numbers in lists, untyped nodes (merge parameters, _target_ nodes, Any-typed options) and options that only
# matter in another mode (sampling temperature): (experiment, overrides with {v}, the key the message names).
NESTED = [
    ("eva_addsub", ["ensemble.combiner=linear_sum", "ensemble.weights=[{v}]"], "ensemble.weights[0]"),
    ("eva_addsub", ["ensemble.do_sample=true", "ensemble.temperature={v}"], "ensemble.temperature"),
    ("eva_addsub", ["align_method.std_filter=[5,{v}]"], "align_method.std_filter[1]"),
    ("eval_addsub", ["generation.do_sample=true", "generation.temperature={v}"], "generation.temperature"),
    ("merge", ["merge_method=linear", "+merge.parameters.weight={v}", "merge.models=[{{model: smollm2_135m}}]"],
     "merge.parameters.weight"),
    ("merge", ["merge_method=linear", "+merge.parameters.weight=[1.0,{v}]", "merge.models=[{{model: smollm2_135m}}]"],
     "merge.parameters.weight[1]"),  # a layer gradient
    ("merge", ["merge_method=ties", "merge.base=smollm2_135m",
               "merge.models=[{{model: smollm2_135m, parameters: {{weight: 1, density: {v}}}}}]"],
     "merge.models[0].parameters.density"),
    ("merge", ["merge_method=slerp", "merge.base=smollm2_135m", "+merge.parameters.t={v}",
               "merge.models=[{{model: smollm2_135m}}]"], "merge.parameters.t"),
    ("chat_vector", ["chat_vector.ratio=[{v}]"], "chat_vector.ratio[0]"),
    ("fusechat_pairwise", ["scheduler=constant", "scheduler.factor={v}"], "scheduler.factor"),  # no range rule
    ("fusechat_pairwise", ["callbacks=[default,chat_vector]", "callbacks.chat_vector.ratio={v}"],
     "callbacks.chat_vector.ratio"),
    ("fusechat_pairwise", ["callbacks=[default,metrics]", "+callbacks.metrics.alpha={v}"], "callbacks.metrics.alpha"),
]


@pytest.mark.parametrize("experiment,overrides,key", NESTED, ids=[c[2] for c in NESTED])
def test_nested_and_untyped_numbers_refuse_nan_and_inf(tmp_path, experiment, overrides, key):
    for i, bad in enumerate(("nan", "inf", "-inf")):
        cfg = _compose([f"+experiment={experiment}", *(o.format(v=bad) for o in overrides)], tmp_path / str(i))
        with pytest.raises(FusionlabError) as err:
            validate(cfg)
        assert f"{key}={bad} is not a finite number" in str(err.value), str(err.value)


def test_a_field_may_declare_that_it_takes_inf():
    """The one escape hatch: a dataclass field with metadata {NON_FINITE: True} (none needs it so far)."""
    from fusionlab.schema import _check_keys_and_numbers

    @dataclass
    class Node:
        budget: float = field(default=float("inf"), metadata={NON_FINITE: True})
        rate: float = 0.5

    _check_keys_and_numbers(OmegaConf.structured(Node), "node")
    with pytest.raises(FusionlabError, match=r"node.rate=nan is not a finite number.*default is 0.5"):
        _check_keys_and_numbers(OmegaConf.structured(Node(rate=float("nan"))), "node")


@pytest.mark.parametrize("value", NON_FINITE_VALUES)
def test_merge_parameters_refuse_nan_and_inf_outside_the_config(value):
    """A mergekit YAML's parameters never pass through the composed config: the method's own check refuses them."""
    from fusionlab.merge.registry import get_method

    with pytest.raises(FusionlabError, match=rf"'weight' = {value} in mergekit.yml must be a finite number"):
        get_method("linear").check_names({"weight": value}, "mergekit.yml", one_model=True)


# ---------------------------------------------------------------------------------------------- model weights

def _save_tiny(path, edit=None):
    from fusionlab.models import load_model

    model, tok = load_model({"name": "tiny", "source": "random", "tokenizer": "smollm2_135m",
                             "config": {"model_type": "llama", **TINY_DIMS, "tie_word_embeddings": False}})
    if edit is not None:
        with torch.no_grad():
            edit(model)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _nan_in_down_proj(model):
    model.model.layers[0].mlp.down_proj.weight.view(-1)[5] = float("nan")


def _overflowing(model):
    """Finite weights whose logits overflow (what float16 activations do to a real model)."""
    model.model.norm.weight.fill_(1e4)
    model.lm_head.weight.fill_(3e38)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nonfinite")
    return {"ok": _save_tiny(root / "ok"), "nan": _save_tiny(root / "nan", _nan_in_down_proj),
            "overflow": _save_tiny(root / "overflow", _overflowing)}


NAN_TENSOR = "'model.layers.0.mlp.down_proj.weight'"


def test_load_model_refuses_a_nan_weight(models):
    from fusionlab.models import load_model

    with pytest.raises(FusionlabError) as err:
        load_model({"name": "broken", "source": "hf", "path": str(models["nan"])})
    message = str(err.value)
    assert NAN_TENSOR in message and "'broken'" in message and str(models["nan"]) in message and "NaN or inf" in message


def test_perplexity_and_checkpoint_scores_refuse_a_nan_weight(models):
    """The merge job's and fusechat_merge's scorers loaded checkpoints with from_pretrained directly: a NaN
    weight became ppl nan (or a NaN held-out CE) in metrics.json with exit 0."""
    from fusionlab.distill.config import DistillConfig
    from fusionlab.distill.pipeline import score_checkpoints
    from fusionlab.metrics.perplexity import perplexity
    from fusionlab.models import ModelSpec

    assert perplexity(models["ok"], ["one short text", "and another"]) > 1  # the same path, a finite model
    with pytest.raises(FusionlabError, match=NAN_TENSOR):
        perplexity(models["nan"], ["one short text"])
    pivot = ModelSpec(name="pivot", source="hf", path=str(models["ok"]))
    other = ModelSpec(name="s", source="hf", path=str(models["overflow"]))  # a source is required, never loaded
    dc = DistillConfig(pivot=pivot, sources={"s": other})
    with pytest.raises(FusionlabError, match=NAN_TENSOR + r".*'target'"):
        score_checkpoints(dc, {"target": str(models["nan"])}, seed=0)


def test_checkpoint_reader_refuses_a_nan_tensor_for_every_streaming_job(models, tmp_path):
    """merge, chat_vector, extract_lora and tokensurgeon read through CheckpointReader.get; tokensurgeon had no check."""
    from fusionlab.merge.tokenizer import transplant

    with pytest.raises(FusionlabError, match=rf"{NAN_TENSOR} of model .*nan.* contains NaN or inf"):
        transplant(str(models["nan"]), f"model:{models['ok']}", tmp_path / "out", fill="mean", head_fill=None)
    assert not (tmp_path / "out").exists()


def test_a_weight_that_overflows_only_in_a_narrower_dtype_is_named_as_such(tmp_path):
    from safetensors.torch import save_file

    from fusionlab.merge.io import CheckpointReader

    save_file({"w": torch.tensor([1.0, 1e6])}, tmp_path / "model.safetensors")
    reader = CheckpointReader(tmp_path, "model 'm'")
    assert torch.equal(reader.get("w"), torch.tensor([1.0, 1e6]))
    with pytest.raises(FusionlabError, match=r"'w' of model 'm' once converted to torch.float16 contains NaN or inf"):
        reader.get("w", dtype=torch.float16)


def test_generation_refuses_non_finite_logits(models):
    """Greedy decoding of NaN logits emits token 0 as if it were text (evaluate then scored a plain 0.0 accuracy)."""
    from fusionlab.models import load_model
    from fusionlab.models.generation import generate

    model, tok = load_model({"name": "overflow", "source": "hf", "path": str(models["overflow"])})
    with pytest.raises(FusionlabError, match=r"produced NaN or inf next-token logits"):
        generate(model, tok, ["1 + 1 ="], max_new_tokens=2, progress=False)


def test_eva_decoder_refuses_non_finite_logits_of_any_member(models):
    from fusionlab.ensemble import EvaDecoder
    from fusionlab.models import load_model

    model, tok = load_model({"name": "overflow", "source": "hf", "path": str(models["overflow"])})
    with pytest.raises(FusionlabError, match=r"overflow.*produced NaN or inf next-token logits"):
        EvaDecoder((model, tok), topk=5).generate(["1 + 1 ="], max_new_tokens=2)


def test_check_logits_keeps_masked_tokens():
    """-inf is how processors mask tokens: allowed, unless a whole row is masked (no token left to pick)."""
    from fusionlab.models.generation import check_logits

    model = torch.nn.Linear(1, 1)
    check_logits(torch.tensor([[0.0, -float("inf"), 1.0]]), model)
    for bad in ([[0.0, float("nan"), 1.0]], [[0.0, float("inf"), 1.0]], [[-float("inf")] * 3]):
        with pytest.raises(FusionlabError):
            check_logits(torch.tensor(bad), model)


# ---------------------------------------------------------------------------------------------- the CLI

def _assert_refused(proc, run_dir, *needles):
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr[proc.stderr.find("fusionlab: error: "):]
    assert error and all(n in error for n in needles), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and error.strip().count("\n") == 0, proc.stderr[-2000:]
    written = sorted(p.name for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts)
    assert set(written) <= {"metrics.json", "run.log"}, f"nothing but the failure record is written: {written}"


def test_cli_refuses_a_nan_option_before_any_work(tmp_path):
    proc = fusionlab_run(["+experiment=chat_vector", "chat_vector.ratio=nan"], tmp_path / "run")
    _assert_refused(proc, tmp_path / "run", "chat_vector.ratio=nan is not a finite number")


@pytest.mark.parametrize("experiment,overrides", [
    ("eval_addsub", ["model=hf", "model.path={path}", "task.limit=2", "generation.max_new_tokens=4"]),
    ("tokensurgeon", ["tokensurgeon.model={path}", "tokensurgeon.tokenizer=model:{ok}", "tokensurgeon.fill=mean",
                      "tokensurgeon.head_fill=null", "tokensurgeon.eval=null"]),
], ids=["evaluate", "tokensurgeon"])
def test_cli_refuses_a_model_with_a_nan_weight(models, tmp_path, experiment, overrides):
    """Both ran to exit 0 before: evaluate reported accuracy 0.0, tokensurgeon wrote a NaN checkpoint."""
    args = [o.format(path=models["nan"], ok=models["ok"]) for o in overrides]
    proc = fusionlab_run([f"+experiment={experiment}", *args, "logger=csv"], tmp_path / "run")
    _assert_refused(proc, tmp_path / "run", NAN_TENSOR, str(models["nan"]), "NaN or inf")


def test_generation_past_the_context_is_refused_before_the_first_step(models):
    """prompt + max_new_tokens past max_position_embeddings (512 here): learned positions fail mid-run with an index
    error, rotary ones decode positions never trained; refused up front, in both decoders."""
    from fusionlab.ensemble import EvaDecoder
    from fusionlab.models import load_model
    from fusionlab.models.generation import generate

    model, tok = load_model({"name": "ok", "source": "hf", "path": str(models["ok"])})
    with pytest.raises(FusionlabError, match=r"plus max_new_tokens=600 is 60\d tokens, past its context of 512"):
        generate(model, tok, ["1 + 1 ="], max_new_tokens=600, progress=False)
    with pytest.raises(FusionlabError, match=r"past its context of 512"):
        EvaDecoder((model, tok), topk=5).generate(["1 + 1 ="], max_new_tokens=600)
    assert len(generate(model, tok, ["1 + 1 ="], max_new_tokens=3, progress=False).texts) == 1
