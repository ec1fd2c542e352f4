"""The EVA eval callback inside a tiny Lightning fit: it runs at validation end / checkpoints and logs the task metric."""
from __future__ import annotations

import math

import lightning
import torch

from fusionlab.callbacks.eva_eval import EvaEvalCallback

TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024}


class TinyLM(lightning.LightningModule):
    def __init__(self, model, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer

    def training_step(self, batch, _):
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def validation_step(self, batch, _):
        self.log("val_loss", self.model(input_ids=batch[0], labels=batch[0]).loss)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_eva_eval_callback_in_a_fit(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from fusionlab.models import load_model

    m, t = load_model({"name": "main", "source": "random", "tokenizer": "smollm2_135m", "config": TINY})  # trained here
    m.train()
    ids = torch.randint(5, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    # another vocabulary (Gemma-3's), so an alignment is built and cached (a same-tokenizer aux gets the identity)
    aux = {"tiny_aux": {"source": "random", "tokenizer": "gemma3_270m", "seed": 7, "config": TINY,
                        "use_chat_template": False}}
    cb = EvaEvalCallback(task="addsub", limit=2, aux=aux, align_method="exact", max_new_tokens=4,
                         cache_dir=str(tmp_path / "align"), decoder={"topk": 20, "drop": 3}, trigger="validation")
    trainer = lightning.Trainer(max_epochs=1, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb],
                                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    module = TinyLM(m, t)
    trainer.fit(module, loader, loader)
    acc = trainer.callback_metrics["eva_eval/accuracy"]
    assert math.isfinite(float(acc)) and 0.0 <= float(acc) <= 1.0
    assert module.model.training  # the callback restored training mode
    assert len(list((tmp_path / "align").glob("*.safetensors"))) == 1  # the trained main's alignment, cached
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    assert "eva_eval/accuracy" in header


def test_eva_eval_callback_at_checkpoints_without_validation(tmp_path):
    """The distillation trainer has no validation loop: the default trigger runs at each checkpoint save."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from fusionlab.models import load_model

    m, t = load_model({"name": "main", "source": "random", "tokenizer": "smollm2_135m", "config": TINY})
    m.train()
    ids = torch.randint(5, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)
    # another vocabulary (Gemma-3's), so an alignment is built and cached (a same-tokenizer aux gets the identity)
    aux = {"tiny_aux": {"source": "random", "tokenizer": "gemma3_270m", "seed": 7, "config": TINY,
                        "use_chat_template": False}}
    cb = EvaEvalCallback(task="addsub", limit=1, aux=aux, max_new_tokens=3, cache_dir=str(tmp_path / "align"),
                         decoder={"topk": 20, "drop": 3})
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = lightning.Trainer(max_steps=2, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=[cb, ckpt],
                                enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(TinyLM(m, t), loader)
    stored = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)["eva_eval"]
    assert set(stored) == {"eva_eval/accuracy"} and 0.0 <= stored["eva_eval/accuracy"] <= 1.0
    assert stored == cb.last_metrics
