"""A tiny real LightningModule shaped like FuseLightningModule (``.model``, ``.tokenizer``) for callback tests."""
from __future__ import annotations

import lightning
import torch

from fusionlab.models import load_model

TINY_LLAMA = {"name": "tiny", "source": "random", "tokenizer": "smollm2_135m", "seed": 0,
              "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2}}


class TinyLM(lightning.LightningModule):
    """A causal LM trained on random tokens: enough to move the weights between checkpoints."""

    def __init__(self, spec: dict | None = None):
        super().__init__()
        self.model, self.tokenizer = load_model(spec or TINY_LLAMA)
        self.model.train()

    def training_step(self, batch, _):
        (ids,) = batch
        return self.model(input_ids=ids, labels=ids).loss

    def validation_step(self, batch, _):
        (ids,) = batch
        self.log("val_loss", self.model(input_ids=ids, labels=ids).loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def random_token_loader(seed: int = 0, n: int = 8, length: int = 12, batch_size: int = 2):
    ids = torch.randint(5, 500, (n, length), generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=batch_size)
