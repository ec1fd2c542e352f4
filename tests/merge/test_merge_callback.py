"""MergeCallback inside a real (tiny) Lightning fit, and its config with +experiment=fusechat_pairwise."""
from __future__ import annotations

import math

import lightning
import pytest
import torch

from fusionlab.callbacks.merge import MergeCallback
from fusionlab.errors import FusionlabError
from fusionlab.models import load_model
from tests.lightning_helpers import TINY_LLAMA as TINY, TinyLM, random_token_loader as loader

from .conftest import load_dir

@pytest.fixture(scope="module")
def chat_pair(tmp_path_factory):
    """A "pre-trained" and a "chat" tiny model of the same architecture: tau = chat - base."""
    root = tmp_path_factory.mktemp("chat_pair")
    model, tok = load_model({**TINY, "seed": 7})
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(root / "chat")
    tok.save_pretrained(root / "chat")
    return root / "base", root / "chat"


def test_merge_and_chat_vector_callbacks_in_a_fit(tmp_path, chat_pair):
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    texts = ["The cat sat on the mat today.", "Numbers: 1 2 3 4 5 6 7 8."]
    merge_cb = MergeCallback(parameters={"lambda": 0.5}, texts=texts, max_length=16, dirpath=str(tmp_path / "ta"))
    add_cb = MergeCallback(mode="add", chat_base=str(chat_pair[0]), chat=str(chat_pair[1]), ratio=0.5, texts=texts,
                           max_length=16, dirpath=str(tmp_path / "cv"), keep_last=None, prefix="cv")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    module = TinyLM()
    start = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer = lightning.Trainer(max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path), enable_progress_bar=False,
                                callbacks=[merge_cb, add_cb, ckpt], enable_model_summary=False)
    trainer.fit(module, loader())
    trained = {k: v.detach() for k, v in module.model.state_dict().items()}
    assert module.model.training  # left in training mode

    # mode=merge: base = the snapshot of the starting weights; newest step kept only; = base + 0.5 (trained - base)
    assert sorted(p.name for p in (tmp_path / "ta").iterdir()) == ["base", "step000004"]
    snap, merged = load_dir(tmp_path / "ta" / "base"), load_dir(tmp_path / "ta" / "step000004")
    name = "model.layers.1.mlp.down_proj.weight"
    torch.testing.assert_close(snap[name], start[name])
    assert not torch.equal(trained[name], start[name])
    for k in merged:
        torch.testing.assert_close(merged[k], start[k] + 0.5 * (trained[k] - start[k]))
    assert (tmp_path / "ta" / "step000004" / "tokenizer.json").exists()

    # mode=add: tau extracted once; both steps kept (keep_last=None); = trained + 0.5 (chat - base)
    assert {"chat_vector", "step000002", "step000004"} <= {p.name for p in (tmp_path / "cv").iterdir()}
    added, b, c = load_dir(tmp_path / "cv" / "step000004"), load_dir(chat_pair[0]), load_dir(chat_pair[1])
    for k in added:
        torch.testing.assert_close(added[k], trained[k] + 0.5 * (c[k] - b[k]))
    assert not list((tmp_path / "ta").glob(".trained-*"))  # the temporary export is gone

    # logged to the trainer's loggers and stored in the checkpoint
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ("merge/ppl_merged", "merge/ppl_trained", "merge/ppl_base", "cv/ppl_merged"):
        assert key in header
    assert all(math.isfinite(v) and v > 1 for v in merge_cb.last_metrics.values())
    stored = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)["merge"]
    assert stored["merge/ppl_merged"] == merge_cb.last_metrics["merge/ppl_merged"]
    assert stored["cv/output"] == str(tmp_path / "cv" / "step000004")


def test_callback_errors_name_the_fix():
    with pytest.raises(FusionlabError, match="mode=add needs a chat vector"):
        MergeCallback(mode="add")
    with pytest.raises(FusionlabError, match="trigger='epoch'"):
        MergeCallback(trigger="epoch")
    with pytest.raises(FusionlabError, match="Unknown merge method 'tie'"):
        MergeCallback(method="tie")
    with pytest.raises(FusionlabError, match="mode='chat'"):
        MergeCallback(mode="chat")


def test_chat_vector_callback_composes_with_fusechat_pairwise(compose, tmp_path):
    from hydra.utils import instantiate

    cfg = compose(["+experiment=fusechat_pairwise", "callbacks=[default,chat_vector]",
                   "callbacks.chat_vector.method=ties", "+callbacks.chat_vector.model_parameters.density=0.5"],
                  tmp_path / "run")
    cbs = {k: instantiate(v) for k, v in cfg.callbacks.items() if v is not None and "_target_" in v}
    assert {"model_checkpoint", "lr_monitor", "progress_bar", "chat_vector"} <= set(cbs)
    cb = cbs["chat_vector"]
    assert isinstance(cb, MergeCallback) and cb.method == "ties" and cb.model_parameters["density"] == 0.5
    assert cb.dirpath == str(tmp_path / "run" / "merged") and len(cb.texts) == 8
