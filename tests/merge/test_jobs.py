"""The merge and chat_vector jobs through Hydra: CLI end to end, mergekit YAML, both experiments on a tiny model."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusionlab.merge.io import CheckpointReader

from .conftest import load_dir

REPO = Path(__file__).resolve().parents[2]


def test_merge_cli_end_to_end(tmp_path, family):
    run_dir = tmp_path / "run"
    models = (f"[{{model: '{family['m0']}', parameters: {{weight: 1.0}}}}, "
              f"{{model: '{family['m1']}', parameters: {{weight: 0.5}}}}]")
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=merge", "merge_method=task_arithmetic",
           f"merge.base={family['base']}", f"merge.models={models}", "+merge.parameters.lambda=0.5",
           "logger=none", f"hydra.run.dir={run_dir}"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["merge_method"] == "task_arithmetic"
    got, b, m0, m1 = (load_dir(run_dir / "merged"), load_dir(family["base"]), load_dir(family["m0"]), load_dir(family["m1"]))
    for k in b:
        torch.testing.assert_close(got[k], b[k] + 0.5 * ((m0[k] - b[k]) + 0.5 * (m1[k] - b[k])))


def test_bad_parameter_through_the_job_writes_nothing(tmp_path, family, compose):
    from fusionlab.errors import FusionlabError
    from fusionlab.run import run

    cfg = compose(["+experiment=merge", f"merge.base={family['base']}", f"merge.models=[{{model: '{family['m0']}'}}]",
                   "+merge.parameters.lamda=0.5", "logger=none"], tmp_path / "run")
    with pytest.raises(FusionlabError, match="lamda"):
        run(cfg)
    assert not (tmp_path / "run" / "merged").exists()


def test_mergekit_config_through_the_job(tmp_path, family, compose):
    from fusionlab.run import run

    y = tmp_path / "mk.yml"
    y.write_text(f"merge_method: linear\nmodels:\n  - model: {family['m0']}\n    parameters: {{weight: 1.0}}\n"
                 f"  - model: {family['m1']}\n    parameters: {{weight: 3.0}}\ndtype: float32\n")
    cfg = compose(["+experiment=merge", f"merge.mergekit_config={y}", "logger=none"], tmp_path / "run")
    metrics = run(cfg)
    assert metrics["merge_method"] == "linear"
    got, m0, m1 = load_dir(tmp_path / "run" / "merged"), load_dir(family["m0"]), load_dir(family["m1"])
    for k in got:
        torch.testing.assert_close(got[k], (m0[k] + 3 * m1[k]) / 4)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """A 2-layer Llama with SmolLM2's real tokenizer, saved like a HF checkpoint (for derive + perplexity)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fusionlab.models import embedded_checkpoint

    src = embedded_checkpoint("smollm2_135m")
    out = tmp_path_factory.mktemp("tiny_hf") / "tiny"
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out


FAST = ["{node}.derive.{n}.steps=1", "{node}.derive.{n}.max_length=16", "{node}.derive.{n}.batch_size=1"]


@pytest.mark.parametrize("experiment,derived", [("chat_vector", ["chat", "cp"]), ("sce_merge", ["chat", "addsub"])])
def test_experiments_run_on_a_tiny_base(tmp_path, tiny_hf, compose, monkeypatch, experiment, derived):
    from fusionlab.run import run

    monkeypatch.setenv("FUSIONLAB_CACHE", str(tmp_path / "cache"))
    node = "chat_vector" if experiment == "chat_vector" else "merge"
    over = [f"+experiment={experiment}", f"{node}.base={tiny_hf}", "logger=none", f"{node}.eval.max_length=16"]
    over += [o.format(node=node, n=n) for n in derived for o in FAST]
    if experiment == "sce_merge":  # two of the three fine-tunes and one eval set keep this test short
        over += ["merge.models=[{model: 'derived:chat'}, {model: 'derived:addsub'}]", "~merge.derive.e2e",
                 "~merge.eval.sets.addsub", "~merge.eval.sets.e2e"]
    cfg = compose(over, tmp_path / "run")
    assert cfg.job == ("chat_vector" if experiment == "chat_vector" else "merge")
    metrics = run(cfg)
    merged = CheckpointReader(tmp_path / "run" / "merged")
    assert merged.shape["model.embed_tokens.weight"] == (49152, 16)
    assert (tmp_path / "run" / "merged" / "tokenizer.json").exists()
    assert all(f"ppl_mean/{k}" in metrics for k in ["base", "merged"])
    assert all(v > 1 for k, v in metrics.items() if k.startswith("ppl"))
    cached = list((tmp_path / "cache" / "merge_fixtures").iterdir())
    assert len(cached) == len(derived)  # fine-tunes are cached, keyed by their inputs
    if experiment == "chat_vector":
        tau, base, chat = (load_dir(tmp_path / "run" / "chat_vectors" / "cv0"), load_dir(tiny_hf),
                           load_dir(next(p for p in cached if p.name.startswith("chat"))))
        name = "model.layers.0.mlp.up_proj.weight"
        torch.testing.assert_close(tau[name], chat[name] - base[name])
    else:
        assert metrics["merge_method"] == "sce"


def test_all_merge_method_configs_compose(compose, tmp_path):
    from fusionlab.merge import METHODS

    for name in METHODS:
        cfg = compose(["+experiment=merge", f"merge_method={name}"], tmp_path / name)
        assert cfg.merge.method == name and cfg.job == "merge"


def test_bad_values_exit_2_before_any_model_loads(tmp_path):
    """A bad parameter value, derive entry or chat vector ratio fails while the config is checked: no
    fine-tune, no model load, nothing written (the fine-tunes of sce_merge would take minutes)."""
    cases = [("sce_merge", "merge.parameters.select_topk=high", "'select_topk' = 'high'"),
             ("sce_merge", "merge.derive.chat.kind=chatt", "Unknown text kind 'chatt'"),
             ("merge", "merge.dtype=fp8", "Unknown merge.dtype 'fp8'"),
             ("chat_vector", "chat_vector.ratio=[0.5,0.5]", r"chat_vector.ratio=\[0.5, 0.5\]: give a number, or a list of 1")]
    for experiment, override, message in cases:
        run_dir = tmp_path / experiment
        res = subprocess.run([sys.executable, "-m", "fusionlab.run", f"+experiment={experiment}", override, "logger=none",
                              f"hydra.run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "FUSIONLAB_CACHE": str(tmp_path / "cache")})
        assert res.returncode == 2, res.stderr[-2000:]
        assert "fusionlab: error:" in res.stderr and re.search(message, res.stderr), res.stderr[-2000:]
        assert not (tmp_path / "cache" / "merge_fixtures").exists() and not (run_dir / "merged").exists()


def test_perplexity_excludes_padding(tiny_hf):
    """Batched (padded) perplexity = exp(total NLL / tokens) of each text scored alone, computed here directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusionlab.metrics.perplexity import perplexity, perplexity_table

    texts = ["A short one.", "A much longer text with quite a few more tokens than the first one has.", "Mid length."]
    tok = AutoTokenizer.from_pretrained(tiny_hf)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            nll -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    want = math.exp(nll / count)
    assert abs(perplexity(tiny_hf, texts, batch_size=3) - want) < 1e-4 * want
    table = perplexity_table({"tiny": tiny_hf}, {"a": texts, "b": texts[:1]}, batch_size=2)
    assert abs(table["ppl/a/tiny"] - want) < 1e-3 * want
    assert abs(table["ppl_mean/tiny"] - math.sqrt(table["ppl/a/tiny"] * table["ppl/b/tiny"])) < 1e-3


def test_a_derive_entry_no_input_names_is_not_trained(tmp_path, monkeypatch, caplog):
    """extract_lora / chat_vector / merge experiments ship a derive entry for their default input; a user who
    replaces that input (extract_lora.finetuned=/my/ckpt) paid for the fine-tune anyway."""
    import logging

    from fusionlab.merge.derive import DeriveSpec, derive_models

    monkeypatch.setenv("FUSIONLAB_CACHE", str(tmp_path / "cache"))
    spec = DeriveSpec(kind="chat", stop=4, steps=1)
    with caplog.at_level(logging.INFO, logger="fusionlab.merge.derive"):
        assert derive_models({"chat": spec}, "smollm2_135m", used=["smollm2_135m", "/my/ckpt"]) == {}
    assert "'chat' is not used by any input" in caplog.text
    assert not (tmp_path / "cache" / "merge_fixtures").exists()
