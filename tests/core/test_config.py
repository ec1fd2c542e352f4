"""Every config file composes; experiments land their keys at the top level."""
from __future__ import annotations

import pytest
import yaml
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR

GROUP_FILES = sorted({(p.parent.relative_to(CONF_DIR).as_posix(), p.stem) for p in CONF_DIR.rglob("*.yaml")
                      if p.parent != CONF_DIR and p.parent.name != "experiment"
                      and p.parent.relative_to(CONF_DIR).as_posix() != "hydra"})
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def _override(group: str, name: str) -> str:
    # groups in the primary defaults list are overridden; the others are added
    primary = {"paths", "model", "task", "logger", "hydra"}
    top = group.split("/")[0]
    if group.startswith("hydra/"):
        return f"{group}={name}"
    return f"{group}={name}" if top in primary else f"+{group}={name}"


def test_primary_config_composes(compose):
    cfg = compose([])
    assert cfg.job == "evaluate"
    assert cfg.model.name == "smollm2_135m" and cfg.task.name == "addsub"
    assert "experiment" not in cfg  # experiments are added with +experiment=, never a default


@pytest.mark.parametrize("group,name", GROUP_FILES, ids=[f"{g}/{n}" for g, n in GROUP_FILES])
def test_every_group_file_composes(compose, group, name):
    if group in ("hparams_search",):
        pytest.skip("hparams_search files are composed with their experiment in test_sweeps")
    cfg = compose([_override(group, name)])
    assert cfg is not None


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_at_top_level(compose, name):
    cfg = compose([f"+experiment={name}"])
    raw = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text())
    first_line = (CONF_DIR / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
    assert first_line.strip() == "# @package _global_"
    assert "experiment" not in cfg, "experiment keys must land at the top level"
    for key in raw:
        if key != "defaults":
            assert key in cfg, f"{name}: key {key!r} is not at the top level"
    assert isinstance(cfg.job, str)
    OmegaConf.to_container(cfg.model, resolve=False)
