"""RepresentationMetricsCallback (and its Diff-eRank configuration) inside a real (tiny) Lightning fit."""
from __future__ import annotations

import math

import lightning
import pytest
import torch

from fusionlab.callbacks.metrics import RepresentationMetricsCallback
from fusionlab.errors import FusionlabError
from fusionlab.metrics.suite import METRICS
from tests.lightning_helpers import TinyLM, random_token_loader as loader

def test_callback_in_a_fit_validation_and_checkpoint_triggers(tmp_path):
    """One tiny fit, two callbacks: per-validation logging (cached twin) and per-checkpoint storage."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    cb = RepresentationMetricsCallback(metrics=["diff_erank"], limit=3, max_length=32, layers="all", seed=0,
                                       trigger="validation", prefix="diff_erank")
    seen = []
    orig = cb.compute

    def spy(pl_module):  # record what each validation produced (and the twin cache's identity)
        out = orig(pl_module)
        seen.append((out, id(cb.twin)))
        return out

    cb.compute = spy
    on_ckpt = RepresentationMetricsCallback(texts=["The cat sat on the mat today.", "Numbers: 1 2 3 4 5 6."],
                                            metrics=["diff_erank"], trigger="checkpoint", max_length=32,
                                            prefix="ckpt_erank")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False, save_top_k=-1, every_n_epochs=2)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path),
                                callbacks=[cb, on_ckpt, ckpt], enable_progress_bar=False, enable_model_summary=False,
                                num_sanity_val_steps=1)
    module = TinyLM()
    trainer.fit(module, loader(0, n=4), loader(1, n=4))

    assert len(seen) == 2  # two epochs; the sanity check is skipped
    assert seen[0][1] == seen[1][1]  # the untrained twin was evaluated once
    logged = trainer.callback_metrics
    for key in ("diff_erank/erank_trained", "diff_erank/erank_untrained", "diff_erank/diff_erank",
                "diff_erank/diff_erank_arith", "diff_erank/layer1/diff_erank"):
        assert key in logged and math.isfinite(float(logged[key]))
    assert float(logged["diff_erank/diff_erank"]) == pytest.approx(
        float(logged["diff_erank/erank_untrained"]) - float(logged["diff_erank/erank_trained"]), rel=1e-5)
    # training moved the weights, so the model is no longer its seed-0 twin
    assert seen[1][0]["diff_erank/diff_erank"] != 0.0
    assert module.model.training  # the callback put the model back in training mode
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "diff_erank/diff_erank" in header and "ckpt_erank/diff_erank" in header

    (path,) = list((tmp_path / "ckpt").glob("*.ckpt"))
    stored = torch.load(path, weights_only=False)["representation_metrics"]
    assert stored == on_ckpt.last_metrics and math.isfinite(stored["ckpt_erank/diff_erank"])


def test_callback_errors_name_the_fix():
    with pytest.raises(FusionlabError, match="trigger='epoch'"):
        RepresentationMetricsCallback(trigger="epoch")
    with pytest.raises(FusionlabError, match="empty list"):
        RepresentationMetricsCallback(texts=[])
    with pytest.raises(FusionlabError, match=r"Unknown metric\(s\) \['erank'\]"):
        RepresentationMetricsCallback(metrics=["erank"])
    with pytest.raises(FusionlabError, match="layerz.*valid options"):
        RepresentationMetricsCallback(layerz="all")
    cb = RepresentationMetricsCallback(limit=2, model_attr="net")
    with pytest.raises(FusionlabError, match="pl_module.net"):
        cb.compute(TinyLM())


def test_callback_yaml_instantiates():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.conftest import CONF_DIR

    node = OmegaConf.load(CONF_DIR / "callbacks" / "diff_erank.yaml").diff_erank
    cb = instantiate(node, limit=2, layers=[0, -1])
    assert isinstance(cb, RepresentationMetricsCallback) and len(cb.texts) == 2 and cb.settings.layers == [0, -1]
    assert cb.settings.metrics == ["diff_erank"] and cb.prefix == "diff_erank"
    suite = instantiate(OmegaConf.load(CONF_DIR / "callbacks" / "metrics.yaml").metrics)
    assert suite.settings.metrics == list(METRICS) and len(suite.texts) == 16 and suite.settings.max_length == 256


def test_suite_callback_at_checkpoints(tmp_path):
    """The whole suite at each checkpoint of a short fit: every metric logged per layer, stored in the .ckpt,
    the twin evaluated once, values moving as training moves the weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    cb = RepresentationMetricsCallback(metrics=["suite"], limit=6, max_length=24, layers="all", views=4)
    twins = []
    orig = cb.compute

    def spy(pl_module):
        out = orig(pl_module)
        twins.append(id(cb.twin))
        return out

    cb.compute = spy
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False, save_top_k=-1, every_n_epochs=1)
    trainer = lightning.Trainer(max_epochs=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb, ckpt],
                                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(TinyLM(), loader(0, n=4))
    assert len(twins) == 2 and twins[0] == twins[1]
    paths = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    stored = [torch.load(p, weights_only=False)["representation_metrics"] for p in paths]
    keys = ("diff_erank", "prompt_entropy", "dataset_entropy", "curvature", "lidar", "dime", "infonce", "nuclear_norm")
    for values in stored:
        for key in keys:
            assert math.isfinite(values[f"metrics/{key}"]) and math.isfinite(values[f"metrics/layer1/{key}"]), key
    assert stored[0]["metrics/prompt_entropy"] != stored[1]["metrics/prompt_entropy"]
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "metrics/lidar" in header and "metrics/layer0/curvature" in header
