"""Shared fixtures: compose configs like the CLI does, and keep test runs quiet and offline."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)  # tests never log online

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


def compose_config(overrides: list[str], output_dir: Path):
    """Compose ``conf/config.yaml`` with overrides, with Hydra's runtime set as under the CLI."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from fusionlab.run import register_configs

    register_configs()  # the typed root schema conf/config.yaml starts from
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"hydra.run.dir={output_dir}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture
def compose(tmp_path):
    def _compose(overrides: list[str], output_dir: Path | None = None):
        return compose_config(overrides, output_dir or tmp_path / "run")
    return _compose


# Tiny random models paired with the REAL tokenizers of the embedded models (align + ensemble tests).
TINY_DIMS = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="session")
def tiny_pair():
    """(tiny random llama + SmolLM2 tokenizer, tiny random gemma3 + Gemma-3 tokenizer)."""
    from fusionlab.models import load_model

    main = load_model({"name": "m", "source": "random", "tokenizer": "smollm2_135m",
                       "config": {"model_type": "llama", **TINY_DIMS}})
    aux = load_model({"name": "g", "source": "random", "tokenizer": "gemma3_270m", "seed": 1,
                      "config": {"model_type": "gemma3_text", **TINY_DIMS, "head_dim": 8, "num_key_value_heads": 1}})
    return main, aux
