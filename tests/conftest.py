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
