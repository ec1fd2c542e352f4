"""What every job shares: typed config nodes, its tracker and loggers, its trainer, its task inputs."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fusionlab.models import ModelSpec
from fusionlab.tracking import Tracker, is_multirun, sweep_group_name, wandb_mode


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts/lists pass through)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def model_spec(node: Any) -> ModelSpec:
    """The typed spec of a ``model``-like node (a ModelSpec or a plain mapping pass through)."""
    if OmegaConf.is_config(node):
        node = OmegaConf.to_object(node)
    return node if isinstance(node, ModelSpec) else ModelSpec.from_dict(node)


def multirun_sweep_dir() -> Path | None:
    """The sweep dir when this process runs one job of a Hydra multirun; None for a single run or outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra = HydraConfig.get()
    return Path(str(hydra.sweep.dir)) if is_multirun(hydra) else None


def _wandb_run(cfg: DictConfig, output_dir: Path, wandb: Any) -> dict[str, Any]:
    """The W&B run options of a job: mode resolved, a sweep's jobs grouped together, a readable name."""
    sweep = multirun_sweep_dir()
    return {"mode": wandb_mode(wandb.get("mode")),
            "group": wandb.get("group") or (sweep_group_name(cfg.job, sweep) if sweep else None),
            "name": wandb.get("name") or f"{cfg.job}-{output_dir.name}"}


def make_tracker(cfg: DictConfig, output_dir: Path) -> Tracker:
    """One Tracker (W&B run + CSV) for a job, configured by ``cfg.logger``."""
    wb = (cfg.get("logger") or {}).get("wandb")
    resolved = {k: to_dict(v) for k, v in cfg.items() if k != "hydra"}  # hydra's own node is not ours to log
    if wb is None:
        return Tracker(output_dir, resolved, use_wandb=False)
    return Tracker(output_dir, resolved, use_wandb=True, project=wb.get("project", "fusionlab"),
                   tags=[*(wb.get("tags") or []), str(cfg.job)], job_type=str(cfg.job),
                   **_wandb_run(cfg, output_dir, wb))


def lightning_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """Instantiate ``cfg.logger``'s Lightning loggers, resolving W&B's mode and sweep group."""
    from hydra.utils import instantiate

    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        node = to_dict(node)
        if key == "wandb":
            node.update(_wandb_run(cfg, output_dir, node))
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
    """(task definition, evaluated examples, few-shot demonstrations) from ``cfg.task``; the task's data is
    read once for both, and a demonstration is never an evaluated example."""
    from fusionlab.tasks import TaskConfig, few_shot_examples, get_task, load_examples, select_examples

    t: TaskConfig = OmegaConf.to_object(cfg.task)
    task = get_task(t.name)
    everything = load_examples(task, path=t.path)
    examples = select_examples(everything, t.limit, t.seed, t.shuffle)
    shots = few_shot_examples(task, t.n_shot, seed=t.seed, exclude={ex["id"] for ex in examples}, pool=everything)
    return task, examples, shots
