"""Config → plain-object helpers shared by the jobs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.models import ModelSpec
from fusionlab.tracking import Tracker, sweep_group_name, wandb_mode


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts/lists pass through)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def model_spec(node: Any) -> ModelSpec:
    return ModelSpec.from_dict(to_dict(node))


def sweep_group(cfg: DictConfig) -> str | None:
    """The W&B group of a multirun: the sweep dir's name, so a sweep's jobs sit together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        hc = HydraConfig.get()
    except ValueError:
        return None
    if hc.mode == RunMode.MULTIRUN:
        return sweep_group_name(cfg.get("job"), hc.sweep.dir)
    return None



def make_tracker(cfg: DictConfig, output_dir: Path) -> Tracker:
    """One Tracker (W&B run + CSV) for a job, configured by ``cfg.logger``."""
    logger = cfg.get("logger") or {}
    wb = logger.get("wandb")
    resolved = {k: to_dict(v) for k, v in cfg.items() if k != "hydra"}  # hydra's own node is not ours to log
    if wb is None:
        return Tracker(output_dir, resolved, use_wandb=False)
    name = wb.get("name") or f"{cfg.get('job')}-{output_dir.name}"
    tags = list(wb.get("tags") or []) + [str(cfg.get("job"))]
    return Tracker(output_dir, resolved, use_wandb=True, project=wb.get("project", "fusionlab"),
                   mode=wandb_mode(wb.get("mode")), group=wb.get("group") or sweep_group(cfg), name=name,
                   tags=tags, job_type=str(cfg.get("job")))


def lightning_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """Instantiate ``cfg.logger``'s Lightning loggers, resolving W&B's mode and sweep group."""
    from hydra.utils import instantiate

    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        node = to_dict(node)
        if key == "wandb":
            node["mode"] = wandb_mode(node.get("mode"))
            node["group"] = node.get("group") or sweep_group(cfg)
            node.setdefault("name", f"{cfg.get('job')}-{output_dir.name}")
        loggers.append(instantiate(node))
    return loggers


def lightning_trainer(cfg: DictConfig, output_dir: Path):
    """A Lightning Trainer from ``cfg.trainer`` with ``cfg.callbacks`` and ``cfg.logger``, writing under
    ``output_dir``: every ``${paths.output_dir}`` in those nodes points there (fusechat_merge fits one
    pairwise target per sub dir)."""
    import copy

    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ProgressBar
    from omegaconf import open_dict

    if Path(cfg.paths.output_dir) != Path(output_dir):
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values()
                 if node is not None and "_target_" in node]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=lightning_loggers(cfg, output_dir) or False)

def task_inputs(cfg: DictConfig):
    """(task definition, evaluated examples, few-shot demonstrations) from ``cfg.task``."""
    from fusionlab.tasks import few_shot_examples, get_task, load_examples, select_examples

    t = cfg.task
    task = get_task(t.name)
    everything = load_examples(task.name, path=t.get("path"))  # read once: evaluated examples and demos
    examples = select_examples(everything, t.get("limit"), t.get("seed", 0), t.get("shuffle", False))
    shots = few_shot_examples(task.name, t.get("n_shot", 0), seed=t.get("seed", 0), exclude={ex["id"] for ex in examples},
                              pool=everything)
    return task, examples, shots
