"""Command-line entry: ``python -m fusionlab.run +experiment=NAME [overrides]``.

A thin ``@hydra.main`` that hands the composed config to :func:`run`, a plain function
that tests call directly. ``cfg.job`` is a key of :data:`JOBS`, whose module's
``run(cfg, output_dir) -> dict`` does the work; the returned flat dict is written to
``<output_dir>/metrics.json``, the file every sweep and report reads.

The config is typed (:mod:`fusionlab.schema`): a mistyped key or a value of the wrong type
fails while Hydra composes, a bad value (a range, a choice, a missing path) in
:func:`fusionlab.schema.validate` before the job starts; both end as one
``fusionlab: error:`` paragraph with exit status 2, before any model loads.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fusionlab.errors import FusionlabError, traceback_frames, user_error
from fusionlab.io import clean_stale_temps, write_json
from fusionlab.schema import GROUP_SCHEMAS, RootConfig, config_error_message, override_on_null_message, validate

log = logging.getLogger("fusionlab")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# conf/hydra/launcher/*.yaml share their names with the launcher plugins' schemas on purpose (so a
# mistyped launcher option fails); Hydra warns about that matching on every run.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/\w+' is validated against ConfigStore schema")


# job name -> module whose run(cfg, output_dir) -> dict does the work (imported only when that job runs)
JOBS: dict[str, str] = {
    "evaluate": "fusionlab.jobs.evaluate",
    "ensemble": "fusionlab.jobs.ensemble",
    "distill": "fusionlab.jobs.distill",
    "fusechat_merge": "fusionlab.jobs.fusechat_merge",
    "merge": "fusionlab.jobs.merge",
    "chat_vector": "fusionlab.jobs.chat_vector",
    "diff_erank": "fusionlab.jobs.representation_metrics",
    "representation_metrics": "fusionlab.jobs.representation_metrics",
    "tokensurgeon": "fusionlab.jobs.tokensurgeon",
    "extract_lora": "fusionlab.jobs.extract_lora",
}

SCHEMA_NAME = "fusionlab_schema"  # conf/config.yaml's first defaults entry


def first_free_job_number(sweep_dir: str) -> int:
    """One past the highest numbered job dir already in ``sweep_dir`` (0 for a new sweep)."""
    path = Path(sweep_dir)
    numbers = [int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir()] if path.is_dir() else []
    return max(numbers, default=-1) + 1


class ContinueJobNumbers:
    """Hydra callback: a sweep continued in an existing sweep dir numbers its jobs after the existing ones.

    ``hydra.sweep.subdir`` is ``job.num + ${fusionlab_first_job:<sweep dir>}`` (conf/hydra/default.yaml).
    That resolver is cached, and Hydra copies the sweep's resolver cache into every job's config
    (the mechanism that keeps ``${now:}`` equal across jobs), so resolving it once here, before the first
    job, fixes the offset for the whole sweep — also in joblib / submitit / SLURM worker processes.
    It also checks the launcher's and the sweeper's settings then, before any job or Optuna study exists.
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        from fusionlab.targets import check_target_node

        launcher = OmegaConf.to_container(config.hydra.launcher, resolve=True)
        try:
            if isinstance(launcher, dict) and "_target_" in launcher:  # before the launcher starts any job
                check_target_node(launcher, "hydra.launcher")
            for key in ("n_trials", "n_jobs"):  # Optuna's sweeper: 0 trials was its "Record does not exist" traceback
                value = config.hydra.sweeper.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                    raise FusionlabError(f"hydra.sweeper.{key}={value!r} must be an integer >= 1 (trials to run / "
                                         f"to run at once); set hydra.sweeper.{key}=<n>.")
        except FusionlabError as err:  # Hydra turns a callback's exception into a warning: stop here instead
            print(f"fusionlab: error: {err}", file=sys.stderr)
            sys.exit(2)

        with read_write(config), open_dict(config):  # resolve it once in the sweep's config: the value is cached
            config["_fusionlab_first_job"] = "${fusionlab_first_job:${hydra.sweep.dir}}"
            first = int(config["_fusionlab_first_job"])
            del config["_fusionlab_first_job"]
        if first:
            log.info("Sweep dir %s already holds jobs 0..%d: new jobs are numbered from %d",
                     config.hydra.sweep.dir, first - 1, first)

    def __getattr__(self, name: str):  # Hydra calls every on_* hook by name
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def register_configs() -> None:
    """Put the typed root schema into Hydra's ConfigStore and our resolvers into OmegaConf (idempotent;
    tests composing configs call it too)."""
    ConfigStore.instance().store(name=SCHEMA_NAME, node=RootConfig)
    for (group, name), node in GROUP_SCHEMAS.items():
        ConfigStore.instance().store(group=group, name=name, node=node)
    if not OmegaConf.has_resolver("fusionlab_first_job"):
        OmegaConf.register_new_resolver("fusionlab_first_job", first_free_job_number, use_cache=True)
        OmegaConf.register_new_resolver("fusionlab_add", lambda a, b: int(a) + int(b))


register_configs()


def _job_module(name: str):
    if name not in JOBS:
        raise FusionlabError(f"Unknown job {name!r}; set job= to one of {sorted(JOBS)}.")
    return importlib.import_module(JOBS[name])


def _numbers(metrics: dict[str, Any]) -> list[str]:
    return sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))


def _objective_error(cfg: DictConfig, available: list[str], when: str) -> FusionlabError | None:
    """A sweep's objective must be a number the job writes: say which ones it does, never hand Optuna a None."""
    objective = cfg.get("objective")
    if objective and objective not in available:
        return FusionlabError(f"objective={objective!r} is not a number the {cfg.job} job {when} metrics.json; "
                              f"set objective= to one of {available}.")
    return None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the job that ``cfg.job`` names and write its ``metrics.json``; return the metrics.

    A job module may declare ``metric_names(cfg)``, the numbers it will write: then a wrong
    ``objective`` fails here, before any model loads; otherwise it fails when the job ends.
    """
    validate(cfg)  # every value check, before any output dir, model or data
    job = _job_module(cfg.job)
    declared = sorted({*job.metric_names(cfg), "wall_s"}) if hasattr(job, "metric_names") else None
    if declared is not None and (failure := _objective_error(cfg, declared, "writes to")):
        raise failure
    import lightning

    output_dir = Path(cfg.paths.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FusionlabError(f"paths.output_dir={str(output_dir)!r} cannot be created ({err.strerror}); set "
                             "paths.output_dir to a directory you can write to (or leave it to Hydra's run dir).") from err
    clean_stale_temps(output_dir)  # temp files and dirs of a killed earlier run of this dir
    if cfg.get("seed") is not None:
        lightning.seed_everything(int(cfg.seed), workers=True, verbose=False)
    start = time.perf_counter()
    try:
        metrics = job.run(cfg, output_dir)
    except FusionlabError:
        raise
    except Exception as err:  # a known reader/format error deep in a library: the same one paragraph
        failure = user_error(err)
        if failure is None:
            raise
        raise failure from err
    metrics = {"job": cfg.job, **metrics, "wall_s": round(time.perf_counter() - start, 3), "status": "ok"}
    failure = _objective_error(cfg, _numbers(metrics), "wrote to")
    if failure:
        metrics.update(status="failed", error=str(failure))
    if _is_global_rank_zero():  # multi-GPU jobs run this function once per rank
        write_json(output_dir / "metrics.json", metrics)
        log.info("Wrote %s", output_dir / "metrics.json")
    if failure:
        raise failure
    return metrics


def _is_global_rank_zero() -> bool:
    """Multi-GPU jobs run once per rank and only rank zero writes. Before Lightning is imported (a config
    error) every rank fails alike and writes the same record atomically, so any rank may write it."""
    if "lightning" not in sys.modules:
        return True
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _record_failure(cfg: DictConfig, err: BaseException) -> None:
    """Leave a readable trace of a failed job in its output dir (sweeps report it as failed), unless
    :func:`run` already wrote the job's metrics marked failed."""
    if not _is_global_rank_zero():
        return
    try:
        output_dir = Path(cfg.paths.output_dir)
        written = output_dir / "metrics.json"
        if written.is_file() and json.loads(written.read_text()).get("status") == "failed":
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        write_json(output_dir / "metrics.json",
                   {"job": cfg.get("job"), "status": status, "error": f"{type(err).__name__}: {err}".rstrip(": ")})
    except Exception:  # the original error matters more than this record
        pass


# (sweep dir, job, message) of each multirun job that failed with a FusionlabError, for cli's summary
_FAILED_SWEEP_JOBS: list[tuple[Path, str, str]] = []
_INTERRUPTED_IN: list[str] = []  # the output dir of the job a Ctrl-C stopped, for cli's message

# Hydra's flags that take no value: argparse refuses them after the first override
# (`+experiment=x -m a=1,2` → "unrecognized arguments: a=1,2"), so cli moves them to the front.
VALUELESS_FLAGS = ("-m", "--multirun", "--resolve")


def flags_first(argv: list[str]) -> list[str]:
    """``argv`` with Hydra's value-less flags moved before the overrides (their order otherwise kept)."""
    flags = [a for a in argv[1:] if a in VALUELESS_FLAGS]
    return [argv[0], *flags, *(a for a in argv[1:] if a not in VALUELESS_FLAGS)]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except FusionlabError as err:
        _record_failure(cfg, err)
        print(f"fusionlab: error: {err}", file=sys.stderr)
        from fusionlab.jobs._common import multirun_sweep_dir

        sweep_dir = multirun_sweep_dir()
        if sweep_dir is not None:
            from hydra.core.hydra_config import HydraConfig

            hydra = HydraConfig.get()
            _FAILED_SWEEP_JOBS.append((sweep_dir, f"#{hydra.job.num} ({' '.join(hydra.overrides.task)})", str(err)))
            raise  # hydra records the job as failed; the sweep goes on (cli sums the failures up at the end)
        sys.exit(2)
    except KeyboardInterrupt as err:
        _record_failure(cfg, err)
        _INTERRUPTED_IN.append(str(cfg.paths.output_dir))
        raise
    except BaseException as err:
        _record_failure(cfg, err)
        raise
    objective = cfg.get("objective")
    return float(metrics[objective]) if objective else None


def _raised_in_job(err: BaseException) -> bool:
    """Whether ``err`` passed through :func:`main`, the job itself (else Hydra raised it while setting up)."""
    return any(frame.f_code is main.__wrapped__.__code__ for frame in traceback_frames(err))


def cli() -> None:
    """``main`` with composition errors (unknown key, wrong type, unknown group option) as one paragraph, exit 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    full_errors = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # let composition errors reach us instead of Hydra's own printout
    sys.argv = flags_first(sys.argv)
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: a short note, not the traceback of wherever the job happened to be
        if full_errors == "1":
            raise
        where = f" in {_INTERRUPTED_IN[0]}" if _INTERRUPTED_IN else ""
        print(f"\nfusionlab: interrupted{where}: the job stopped before its end (its metrics.json says interrupted; "
              "files it had finished stay, none is half-written). Run the same command again: it starts over (a "
              "distill fit resumes from its last checkpoint; caches already built are reused).", file=sys.stderr)
        sys.exit(130)
    except (HydraException, OmegaConfBaseException) as err:
        if full_errors == "1":
            raise
        print(f"fusionlab: error: {config_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except FusionlabError:  # Hydra's basic sweeper re-raises a failed job's error after every job ran
        if full_errors == "1" or not _FAILED_SWEEP_JOBS:
            raise
        sweep_dir = _FAILED_SWEEP_JOBS[0][0]
        failures = "; ".join(f"{job}: {message.rstrip('.')}" for _, job, message in _FAILED_SWEEP_JOBS) + "."
        print(f"fusionlab: error: {len(_FAILED_SWEEP_JOBS)} job(s) of the multirun failed, the others ran — {failures} "
              f"Every job's metrics.json says ok or failed; python -m fusionlab.report {sweep_dir} tabulates them.",
              file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # Hydra could not create its run / sweep dir, before any job code ran
        if full_errors == "1" or _raised_in_job(err):
            raise
        print(f"fusionlab: error: cannot create the run directory {err.filename!r} ({err.strerror}); set "
              "paths.log_dir (or hydra.run.dir / hydra.sweep.dir) to a directory you can write to.", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:  # submitit's SLURM launcher off a cluster, before any job ran
        if full_errors == "1" or "srun" not in str(err) or _raised_in_job(err):
            raise
        print("fusionlab: error: hydra/launcher=submitit_slurm needs a SLURM cluster, and this machine has no `srun`; "
              "launch the sweep from the cluster's login node, or use hydra/launcher=submitit_local (or joblib, basic) "
              "here.", file=sys.stderr)
        sys.exit(2)
    except AssertionError as err:  # Hydra's assertion on an override under a null node
        message = override_on_null_message(err)
        if message is None or full_errors == "1":
            raise
        print(f"fusionlab: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
