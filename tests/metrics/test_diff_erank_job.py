"""The ``diff_erank`` job: composed in-process on a tiny model, and ``+experiment=diff_erank`` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.io import read_jsonl
from fusionlab.run import run
from tests.conftest import REPO

KEYS = ("erank_trained", "erank_untrained", "diff_erank", "erank_trained_geo", "erank_untrained_geo",
        "diff_erank_geo", "erank_trained_arith", "erank_untrained_arith", "diff_erank_arith", "n_texts", "n_skipped")


def without_hydra_node(cfg):
    """As under the CLI, where the job's cfg has no `hydra` node (its sweep keys do not resolve in a run)."""
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_experiment_composes_at_top_level(compose):
    cfg = compose(["+experiment=diff_erank"])
    assert cfg.job == "diff_erank" and cfg.metric.layers == "all" and cfg.metric.average == "geometric"
    assert set(cfg.models) == {"smollm2_135m", "gemma3_270m"}
    assert cfg.models.gemma3_270m.source == "embedded"


def test_job_on_a_tiny_model(compose, tmp_path):
    out = tmp_path / "run"
    cfg = compose(["+experiment=diff_erank", "models=null", "model=tiny_llama", "metric.limit=3",
                   "metric.max_length=32", "logger=none", "objective=tiny_llama/diff_erank"], out)
    cfg = without_hydra_node(cfg)
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["n_models"] == 1
    for key in KEYS:
        assert f"tiny_llama/{key}" in metrics
    assert metrics["tiny_llama/n_texts"] == 3 and metrics["tiny_llama/layer"] == 2
    # tiny_llama is seeded 0 like the twin: it is its own untrained twin
    assert metrics["tiny_llama/diff_erank"] == 0.0
    assert json.loads((out / "metrics.json").read_text())["tiny_llama/erank_trained"] == metrics["tiny_llama/erank_trained"]
    rows = read_jsonl(out / "per_layer.jsonl")
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert (out / "erank_layers.png").read_bytes()[:4] == b"\x89PNG"


def test_job_rejects_unknown_metric_keys(compose, tmp_path):
    cfg = compose(["+experiment=diff_erank", "models=null", "model=tiny_llama", "+metric.layerz=all", "logger=none"])
    cfg = without_hydra_node(cfg)
    with pytest.raises(FusionlabError, match="layerz"):
        run(cfg)


@pytest.mark.slow
def test_experiment_end_to_end_on_an_embedded_model(tmp_path):
    """The CLI path on SmolLM2 (the two-model default takes ~2.5x longer; its numbers are in RESULTS.md)."""
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=diff_erank", "models=null",
                           "model=smollm2_135m", "metric.limit=2", "metric.max_length=48",
                           f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in KEYS:
        assert metrics[f"smollm2_135m/{key}"] is not None
    assert metrics["smollm2_135m/n_texts"] == 2 and metrics["smollm2_135m/layer"] == 30
    assert metrics["smollm2_135m/diff_erank"] == pytest.approx(
        metrics["smollm2_135m/erank_untrained"] - metrics["smollm2_135m/erank_trained"])
    assert len(read_jsonl(tmp_path / "per_layer.jsonl")) == 31  # embeddings + 30 blocks
    assert (tmp_path / "erank_layers.png").stat().st_size > 10_000
    assert list((tmp_path / "wandb").glob("offline-run-*")), "an offline W&B run is written"


def test_missing_text_file_is_a_user_error(compose, tmp_path):
    cfg = without_hydra_node(compose(["+experiment=diff_erank", "models=null", "model=tiny_llama",
                                      "metric.texts=/no/such/texts.jsonl", "logger=none"]))
    with pytest.raises(FusionlabError, match="/no/such/texts.jsonl"):
        run(cfg)


def test_representation_metrics_job_on_a_tiny_model(compose, tmp_path):
    out = tmp_path / "run"
    cfg = without_hydra_node(compose(["+experiment=representation_metrics", "models=null", "model=tiny_llama",
                                      "metric.limit=4", "metric.max_length=32", "metric.views=4", "logger=none"], out))
    metrics = run(cfg)
    assert metrics["job"] == "representation_metrics" and metrics["n_models"] == 1
    keys = ("diff_erank", "prompt_entropy", "dataset_entropy", "curvature", "lidar", "dime", "infonce", "infonce_mi",
            "nuclear_norm")
    stored = json.loads((out / "metrics.json").read_text())
    for key in keys:
        for layer in ("", "layer0/", "layer2/"):
            assert isinstance(stored[f"tiny_llama/{layer}{key}"], float), (layer, key)
    rows = read_jsonl(out / "per_layer.jsonl")
    assert [r["layer"] for r in rows] == [0, 1, 2] and all(set(keys) <= set(r) for r in rows)
    assert rows[-1]["lidar"] == stored["tiny_llama/lidar"]
    for name in ("erank", "matrix_entropy", "curvature", "lidar", "dime", "infonce", "nuclear_norm"):
        assert (out / f"{name}_layers.png").read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize("override,message", [("metric.metrics=[nosuch]", "Unknown metric"),
                                              ("metric.alpha=0", "metric.alpha=0.0")])
def test_cli_bad_metric_values_exit_2_before_any_model_loads(tmp_path, override, message):
    cache = tmp_path / "empty_cache"  # a model load would convert the embedded models into it
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "FUSIONLAB_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=representation_metrics", override,
                           f"hydra.run.dir={tmp_path}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"fusionlab: error: " in proc.stderr and message in proc.stderr
    assert "Loading" not in proc.stderr and not (tmp_path / "per_layer.jsonl").exists()
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
