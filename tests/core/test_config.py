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


def test_one_multirun_check_for_live_and_saved_runs(compose):
    from hydra.types import RunMode

    from fusionlab.jobs._common import multirun_sweep_dir
    from fusionlab.tracking import is_multirun

    single = compose([])
    assert not is_multirun(single.hydra) and multirun_sweep_dir() is None
    swept = compose(["hydra.mode=MULTIRUN", "hydra.sweep.dir=/tmp/sweeps/s1"])
    assert is_multirun(swept.hydra) and str(multirun_sweep_dir()) == "/tmp/sweeps/s1"
    compose([])  # leave Hydra's global config as a single run for the tests after this one
    assert is_multirun({"mode": "MULTIRUN"}) and is_multirun({"mode": RunMode.MULTIRUN})  # a saved hydra.yaml, live
    assert not is_multirun({"mode": "RUN"}) and not is_multirun(None)


@pytest.mark.parametrize("group", ["model", "task"])
def test_group_files_state_only_what_differs_from_the_dataclass(group):
    """Each default is written once, in code: a YAML value equal to it is a second copy that can drift
    (``name`` is each file's identity, not a default)."""
    import dataclasses

    from fusionlab.models import ModelSpec
    from fusionlab.tasks import TaskConfig

    cls = {"model": ModelSpec, "task": TaskConfig}[group]
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(cls)}
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        assert set(raw) <= set(defaults), path.name
        assert not [k for k, v in raw.items() if v == defaults[k] and k != "name"], f"{path.name} restates a default"


def test_task_max_new_tokens_is_honoured_unless_overridden(compose):
    from fusionlab.tasks import get_task

    cfg = compose(["task=nq"])
    assert cfg.generation.max_new_tokens is None and get_task(cfg.task.name).max_new_tokens == 32
    assert compose(["task=nq", "generation.max_new_tokens=8"]).generation.max_new_tokens == 8
