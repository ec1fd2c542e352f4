"""What every job shares: typed config nodes, its tracker and loggers, its trainer, its task inputs, and
the check that a resumed run is the same run."""
from __future__ import annotations

import json
import logging
import secrets
import string
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_write_text, read_json, write_json
from fusionlab.models import ModelSpec
from fusionlab.tracking import Tracker, is_multirun, starting_wandb, sweep_group_name, wandb_mode

log = logging.getLogger(__name__)

RUN_STATE = ".fusionlab"  # <output_dir>/.fusionlab/: the resolved config a resume is compared with, the W&B run id
# Keys that may differ between a run and its resume without changing what it computes: where things go,
# how they are logged, how long to train on, and the resume settings themselves.
RESUME_NEUTRAL = ("paths", "logger", "objective", "resume_mismatch", "distill.resume", "trainer.max_steps",
                  "trainer.max_epochs", "trainer.max_time", "trainer.enable_progress_bar", "trainer.log_every_n_steps")


def to_dict(node: Any) -> Any:
    """A resolved plain-Python copy of a config node (dicts/lists pass through)."""
    if isinstance(node, DictConfig) or OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True)
    return node


def job_node(cfg: DictConfig, key: str, needs: str, start: str) -> Any:
    """The typed ``cfg.<key>`` a job cannot run without, or one error saying which experiment provides it."""
    if cfg.get(key) is None:
        article = "an" if key[0] in "aeiou" else "a"
        raise FusionlabError(f"job={key} needs {article} {key}: block{needs}; start from {start}.")
    return OmegaConf.to_object(cfg[key])


def log_numbers(tracker: Tracker, metrics: dict[str, Any]) -> None:
    """Log a job's numeric results to its tracker and keep all of them in its summary."""
    tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.summary(metrics)


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


def check_perplexity_objective(cfg: DictConfig, evaluation: Any, key: str) -> None:
    """An objective on perplexity (``ppl…``) needs the job's text-set evaluation: say so before the merge or
    extraction runs, not when metrics.json lacks the number."""
    objective = cfg.get("objective")
    if objective and str(objective).startswith("ppl") and evaluation is None:
        raise FusionlabError(f"objective={objective!r} is a perplexity, but {key}=null scores none; give {key} text "
                             "sets, or set objective=null (or to another number the job writes).")


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The whole resolved config of a job as plain Python (Hydra's own node is not ours to log)."""
    return {k: to_dict(v) for k, v in cfg.items() if k != "hydra"}


def wandb_run_id(output_dir: Path) -> str:
    """The W&B run id of the job writing ``output_dir``: made once, stored there, so that a resumed or
    re-run job continues its run instead of leaving an unfinished one beside a new one."""
    path = Path(output_dir) / RUN_STATE / "wandb_id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write_text(path, run_id + "\n")
    return run_id


def _wandb_run(cfg: DictConfig, output_dir: Path, wandb: Any) -> dict[str, Any]:
    """The W&B run of a job: mode resolved, a sweep's jobs grouped together, a readable name, the job type and
    tags, the full resolved config, and a stable id (continued on resume)."""
    sweep = multirun_sweep_dir()
    return {"mode": wandb_mode(wandb.get("mode")),
            "group": wandb.get("group") or (sweep_group_name(cfg.job, sweep) if sweep else None),
            "name": wandb.get("name") or f"{cfg.job}-{output_dir.name}",
            "job_type": str(cfg.job), "tags": [*(wandb.get("tags") or []), str(cfg.job)],
            "config": resolved_config(cfg), "id": wandb_run_id(output_dir), "resume": "allow"}


def make_tracker(cfg: DictConfig, output_dir: Path) -> Tracker:
    """One Tracker (W&B run + CSV) for a job, configured by ``cfg.logger``."""
    wb = (cfg.get("logger") or {}).get("wandb")
    if wb is None:
        return Tracker(output_dir, resolved_config(cfg), use_wandb=False)
    run = _wandb_run(cfg, output_dir, wb)
    return Tracker(output_dir, run.pop("config"), use_wandb=True, project=wb.get("project", "fusionlab"), **run)


def lightning_loggers(cfg: DictConfig, output_dir: Path) -> list:
    """Instantiate ``cfg.logger``'s Lightning loggers; W&B's gets the same run identity as :func:`make_tracker`."""
    from hydra.utils import get_class

    loggers = []
    for key, node in (cfg.get("logger") or {}).items():
        node = to_dict(node)
        if key == "wandb":
            node.update(_wandb_run(cfg, output_dir, node))
        # A plain call, not hydra's recursive instantiate: W&B's ``config`` holds the job's own
        # ``_target_`` nodes (trainer, optimizer ...), which must be logged as config, not built.
        logger = get_class(node.pop("_target_"))(**node)
        if key == "wandb":  # start the run now, not at the fit's first log, after the expensive preparation
            with starting_wandb(node["mode"]):
                logger.experiment
        loggers.append(logger)
    return loggers


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: tree}


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in RESUME_NEUTRAL)


def check_resume(cfg: DictConfig, output_dir: Path, checkpoint: str | None) -> None:
    """Refuse to resume ``checkpoint`` under a config that changes results (naming the keys), unless
    ``resume_mismatch=allow``; then record this run's resolved config for the next resume.

    The record is ``<run dir>/.fusionlab/config.json`` of the run that wrote the checkpoint (its
    ``checkpoints/`` parent); Hydra's ``.hydra/config.yaml`` cannot serve, it is rewritten at every start.
    """
    current = json.loads(json.dumps(resolved_config(cfg), default=str))
    if checkpoint:
        ckpt = Path(checkpoint)
        record = next((d / RUN_STATE / "config.json" for d in (ckpt.parent.parent, ckpt.parent)
                       if (d / RUN_STATE / "config.json").is_file()), None)
        if record is None:
            log.warning("Resuming %s: its run recorded no config, so it cannot be checked against this one.", ckpt)
        else:
            saved, now = _flat(read_json(record, "saved run config")), _flat(current)
            changed = sorted(k for k in saved.keys() | now.keys() if not _neutral(k) and saved.get(k) != now.get(k))
            if changed:
                shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed[:8])
                more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
                if str(cfg.get("resume_mismatch", "refuse")) != "allow":
                    raise FusionlabError(
                        f"will not resume {str(ckpt)!r}: it was trained with a different config — {shown}{more}. "
                        "Resuming would continue those weights under these settings and record the mix as this "
                        "run. Use a new output dir (or distill.resume=false to start over here), or set "
                        "resume_mismatch=allow to resume anyway.")
                log.warning("Resuming %s although the config changed (resume_mismatch=allow): %s%s", ckpt, shown, more)
    write_json(Path(output_dir) / RUN_STATE / "config.json", current)


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


def trainer_factory(cfg: DictConfig, first: Path) -> Callable[[Path], Any]:
    """``make_trainer`` for the library pipelines, with the trainer for ``first`` (the pipeline's first fit) built
    now: its loggers start here, so W&B without network or key refuses before the representations are extracted
    and the pivot is scored, not after."""
    ready = {Path(first): lightning_trainer(cfg, Path(first))}

    def make_trainer(output_dir: Path) -> Any:
        built = ready.pop(Path(output_dir), None)
        return built if built is not None else lightning_trainer(cfg, Path(output_dir))

    return make_trainer


def task_inputs(cfg: DictConfig):
    """(task definition, evaluated examples, few-shot demonstrations) from ``cfg.task``; the task's data is
    read once for both, and a demonstration is never an evaluated example."""
    from fusionlab.tasks import task_inputs as select

    inputs = select(OmegaConf.to_object(cfg.task))
    return inputs.task, inputs.examples, inputs.shots
