"""Input fuzz: every option of every typed config node, from every experiment and group option in conf/, given a
wrong type, an out-of-range value and a missing value must be refused with a FusionlabError naming the key —
in-process through Hydra's compose API and fusionlab.schema.validate (what the CLI does before a job starts),
and a representative handful through ``python -m fusionlab.run`` (exit 2, one paragraph, no traceback, no output).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusionlab.errors import FusionlabError
from fusionlab.schema import config_error_message, validate
from tests.conftest import CONF_DIR, REPO, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
# group -> the experiment whose job uses that group's node (None: any job)
GROUPS = {"model": None, "task": None, "logger": None, "align_method": "eva_addsub", "ensemble": "eva_addsub",
          "merge_method": "merge",
          "metric": "representation_metrics", "distill/mapping": "fusechat_pairwise", "trainer": "fusechat_pairwise",
          "optimizer": "fusechat_pairwise", "scheduler": "fusechat_pairwise", "hparams_search": None}
SEARCH_EXPERIMENT = {"eva_optuna": "eva_addsub", "distill_optuna": "fusechat_pairwise"}  # a search tunes its experiment
OPTIONS = [(group, p.stem) for group in GROUPS for p in sorted((CONF_DIR / group).glob("*.yaml"))]

# Keys where any integer, negative included, is a meaningful value (so -1 is not "out of range"), and why.
ANY_NUMBER = {
    "seed": "any integer seeds a torch / random generator (the root seed, bounded by numpy, is checked)",
    "ratio": "a chat-vector ratio may be negative (subtracting the vector)",
    "threshold": "CSLS scores lie in [-1, 1]: a negative threshold is a real setting",
    "dev_size": "used only with task.split=dev|test, where task.n_shot < task.dev_size is checked",
    "dev_examples": "used only with ensemble.weights_from=dev_score, where it is checked",
    "task_limit": "distill.eval.task_limit and n_shot are used only with distill.eval.task set, where they are checked",
}
CONDITIONAL = {"distill.eval.n_shot"}  # (see task_limit above)
# Dict-typed nodes holding named typed entries (models, sources, targets): their entries are walked too.
NAMED_ENTRIES = ("aux", "sources", "models", "pairwise", "derive")


def _compose(overrides: list[str], tmp: Path):
    try:
        return compose_config(overrides, tmp)
    except OmegaConfBaseException as err:
        raise FusionlabError(config_error_message(err)) from err
    except Exception as err:  # Hydra's own compose errors (override parse, unknown group option)
        if type(err).__module__.startswith("hydra"):
            raise FusionlabError(config_error_message(err)) from err
        raise


def _without_hydra(cfg):
    from omegaconf import open_dict

    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _leaves(obj, prefix: str = "", owner: str = ""):
    """(key, value, (dataclass, field)) of every scalar option; the pair identifies an option wherever it sits."""
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{prefix}.{f.name}" if prefix else f.name,
                               f"{type(obj).__qualname__}.{f.name}")
    elif isinstance(obj, dict) and prefix.rsplit(".", 1)[-1] in NAMED_ENTRIES:
        for k, v in obj.items():
            yield from _leaves(v, f"{prefix}.{k}", owner)
    elif isinstance(obj, (bool, int, float, str)) and not prefix.startswith("paths."):
        yield prefix, obj, owner


def _mutations(key: str, value):
    """(kind, bad value) for one leaf: a wrong type, an out-of-range value, a missing value."""
    name = key.rsplit(".", 1)[-1]
    if isinstance(value, bool):
        yield "wrong type", "maybe"
    elif isinstance(value, (int, float)):
        yield "wrong type", "abc"
        if not any(name == k or name.endswith("_" + k) for k in ANY_NUMBER) and key not in CONDITIONAL:
            yield "out of range", -1
    else:
        yield "wrong type", {"a": 1}
    yield "missing", "???"


def _refusal(cfg, key: str, value) -> str | None:
    """The FusionlabError message of validating ``cfg`` with ``key`` set to ``value``; None if it was accepted."""
    cfg = cfg.copy()
    try:
        OmegaConf.update(cfg, key, value, merge=False)
        validate(cfg)
    except FusionlabError as err:
        return str(err)
    except OmegaConfBaseException as err:
        return config_error_message(err)
    return None


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """Every experiment composed once, less Hydra's own node (validate ignores it; dropping it saves copies)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    return {e: _without_hydra(_compose([f"+experiment={e}"], tmp / e)) for e in EXPERIMENTS}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_group_option_composes_and_validates(tmp_path, group, option):
    """An option with a required value (``???``, e.g. model=hf's path) is refused naming that key."""
    experiment = SEARCH_EXPERIMENT.get(option) if group == "hparams_search" else GROUPS[group] or "eval_addsub"
    cfg = _without_hydra(_compose([f"+experiment={experiment}",
                                   f"{'+' if group == 'hparams_search' else ''}{group}={option}"], tmp_path))
    from fusionlab.schema import _missing_keys

    required = _missing_keys(cfg, "") or [f"{k}.path" for k in ("model",) if cfg.model.path == ""]
    if not required:
        validate(cfg)
        return
    with pytest.raises(FusionlabError, match="missing required value|is required") as err:
        validate(cfg)
    assert all(key in str(err.value) for key in required)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_typed_option_refuses_bad_values(composed, experiment):
    """Each option of each typed node of the experiment; an option (dataclass field) met in an earlier experiment,
    or elsewhere in this one (ModelSpec under model, ensemble.aux, ...), is not fuzzed again."""
    cfg = composed[experiment]
    seen = {o for e in EXPERIMENTS[:EXPERIMENTS.index(experiment)] for *_, o in _leaves(validate(composed[e]))}
    accepted, unnamed, tried = [], [], 0
    for key, value, option in _leaves(validate(cfg)):
        if option in seen:
            continue
        seen.add(option)
        for kind, bad in _mutations(key, value):
            tried += 1
            message = _refusal(cfg, key, bad)
            if message is None:
                accepted.append(f"{key}={bad!r} ({kind})")
            elif kind != "missing" and key.rsplit(".", 1)[-1] not in message:
                unnamed.append(f"{key}={bad!r}: {message[:200]}")
    assert not accepted, f"accepted silently: {accepted}"
    assert not unnamed, f"refused without naming the key: {unnamed}"
    assert tried or experiment != EXPERIMENTS[0]



def test_missing_value_names_the_key(composed):
    message = _refusal(composed["eva_addsub"], "ensemble.topk", "???")
    assert message and "ensemble.topk" in message and "Traceback" not in message


def fusionlab_run(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false", "HYDRA_FULL_ERROR": "0"}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "fusionlab.run", *args, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)


# A representative handful through the real CLI: each kind of failure, across jobs.
CLI_CASES = [
    (["+experiment=eva_addsub", "ensemble.drop=-1"], "ensemble.drop=-1"),
    (["+experiment=eva_addsub", "ensemble.temperature=-0.5"], "ensemble.temperature=-0.5"),  # under greedy
    (["+experiment=eval_addsub", "generation.temperature=0.7"], "greedy"),  # meaningless without sampling
    (["+experiment=fusechat_pairwise", "distill.lam=abc"], "distill.lam"),  # wrong type
    (["+experiment=merge", "merge.method=???"], "merge.method"),  # missing
    # _target_ nodes (fusionlab.targets; the full battery in-process: TARGET_CASES below)
    (["+experiment=fusechat_pairwise", "+trainer.max_stepz=3"], "trainer.max_stepz"),  # misspelt
    (["+experiment=fusechat_pairwise", "callbacks.model_checkpoint.save_top_k=all"],  # wrong type
     "callbacks.model_checkpoint.save_top_k='all'"),
    # a key under a node the experiment sets to null (Hydra asserts instead of raising)
    (["+experiment=eva_addsub", "trainer.val_check_interval=0.5"], "sets trainer to null"),
    (["+experiment=eva_addsub", "+trainer.strategy.x=1"], "+trainer.strategy.x=1"),
    # a new typed entry as a {...} literal (OmegaConf refuses a dict for a ModelSpec): say how to add one
    (["+experiment=eva_addsub", "+ensemble.aux.internlm={source: hf, path: /ckpt/x}"],
     "+model@ensemble.aux.internlm=hf ensemble.aux.internlm.path="),
    # an objective naming a model the run does not score (was found only after every model ran)
    (["+experiment=diff_erank", "models=null", "model=gemma3_270m"], "names model 'smollm2_135m'"),
    # a perplexity objective with the evaluation switched off (was found after the extraction)
    (["+experiment=extract_lora", "extract_lora.eval=null"], "objective='ppl_mean/lora' is a perplexity"),
    # a LoRA of a model against itself (all deltas zero: errors read 0.0)
    (["+experiment=extract_lora", "extract_lora.finetuned=smollm2_135m", "extract_lora.eval=null", "objective=null"],
     "are the same checkpoint"),
    # W&B online without an API key (tests never have one): named before the job's work, with the offline way out
    (["+experiment=eval_addsub", "logger.wandb.mode=online"], "logger.wandb.mode=offline"),
    # an output dir that cannot be created (under /proc nothing can be, even as root)
    (["+experiment=eva_addsub", "paths.output_dir=/proc/fusionlab_no"], "paths.output_dir='/proc/fusionlab_no'"),
]


@pytest.mark.parametrize("args,needle", CLI_CASES, ids=[" ".join(a[1:]) for a, _ in CLI_CASES])
def test_cli_refuses_bad_input_in_one_paragraph(tmp_path, args, needle):
    run_dir = tmp_path / "run"
    proc = fusionlab_run(args, run_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("fusionlab: error: ") and needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "HYDRA_FULL_ERROR" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, "one paragraph"
    state = {".hydra", ".fusionlab"}  # Hydra's record of the run, fusionlab's run state (the W&B run id)
    written = sorted(p.name for p in run_dir.rglob("*") if p.is_file() and not state & set(p.parts)) if run_dir.exists() else []
    assert written in ([], ["metrics.json"], ["run.log"], ["metrics.json", "run.log"]), \
        f"nothing but the failure record (and the run's log) is written: {written}"


@pytest.mark.parametrize("where", ["hydra.run.dir", "hydra.sweep.dir"])
def test_cli_refuses_a_run_dir_hydra_cannot_create(where):
    """Hydra creates its run / sweep dir before any job code runs: its OSError is one paragraph too."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    sweep = ["-m", "ensemble.topk=1,2"] if where == "hydra.sweep.dir" else []
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", *sweep, "+experiment=eva_addsub",
                           f"{where}=/proc/fusionlab_no/run"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("fusionlab: error: cannot create the run directory '/proc/fusionlab_no")
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0


def test_cli_refuses_a_cache_dir_it_cannot_create(tmp_path):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "FUSIONLAB_CACHE": "/proc/fusionlab_no"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=eval_addsub", "task.limit=1",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cache directory '/proc/fusionlab_no'" in proc.stderr and "FUSIONLAB_CACHE" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "predictions.jsonl").exists()


# The _target_ nodes, in-process: (experiment, override, what the message must name), for each node a misspelt key,
# an out-of-range value and a wrong type.
TARGET_CASES = [
    ("fusechat_pairwise", "+trainer.max_stepz=3", ["trainer.max_stepz", "max_steps"]),
    ("fusechat_pairwise", "trainer.max_steps=0", ["trainer.max_steps=0", ">= 1"]),
    ("fusechat_pairwise", "trainer.max_steps=abc", ["trainer.max_steps='abc'"]),
    ("fusechat_pairwise", "trainer.precision=banana", ["trainer.precision='banana'", "bf16-mixed"]),
    ("fusechat_pairwise", "trainer.accumulate_grad_batches=0", ["trainer.accumulate_grad_batches=0"]),
    ("fusechat_pairwise", "trainer.gradient_clip_val=-1", ["trainer.gradient_clip_val=-1"]),
    ("fusechat_pairwise", "trainer.devices=0", ["trainer.devices=0"]),
    ("fusechat_pairwise", "trainer.accelerator=gpux", ["trainer.accelerator='gpux'", "cuda"]),
    ("fusechat_pairwise", "trainer.enable_progress_bar=maybe", ["trainer.enable_progress_bar='maybe'", "bool"]),
    ("fusechat_pairwise", "trainer._target_=lightning.Trainr", ["trainer._target_", "Trainer"]),
    ("fusechat_pairwise", "trainer._target_=nosuchpkg.Trainer", ["trainer._target_", "nosuchpkg"]),
    ("fusechat_pairwise", "+optimizer.lrr=1e-5", ["optimizer.lrr", "lr"]),
    ("fusechat_pairwise", "optimizer.lr=-1", ["optimizer.lr=-1", "> 0"]),
    ("fusechat_pairwise", "optimizer.betas=[2,0]", ["optimizer.betas=[2, 0]", "[0, 1)"]),
    ("fusechat_pairwise", "optimizer.weight_decay=-0.1", ["optimizer.weight_decay=-0.1"]),
    ("fusechat_pairwise", "optimizer.lr=fast", ["optimizer.lr='fast'"]),
    ("fusechat_pairwise", "+scheduler.warmup=0.1", ["scheduler.warmup", "warmup_ratio"]),
    ("fusechat_pairwise", "scheduler.warmup_ratio=1.5", ["scheduler.warmup_ratio=1.5", "[0, 1]"]),
    ("fusechat_pairwise", "scheduler.min_lr_ratio=low", ["scheduler.min_lr_ratio='low'"]),
    ("fusechat_pairwise", "scheduler=constant +scheduler.factr=1", ["scheduler.factr", "factor"]),
    ("fusechat_pairwise", "+callbacks.model_checkpoint.every_n_train_stepz=2",
     ["callbacks.model_checkpoint.every_n_train_stepz", "every_n_train_steps"]),
    ("fusechat_pairwise", "callbacks.model_checkpoint.every_n_train_steps=-1",
     ["callbacks.model_checkpoint.every_n_train_steps=-1"]),
    ("fusechat_pairwise", "callbacks.model_checkpoint.save_top_k=-2", ["callbacks.model_checkpoint.save_top_k=-2"]),
    ("fusechat_pairwise", "callbacks.model_checkpoint.save_top_k=all", ["callbacks.model_checkpoint.save_top_k='all'"]),
    ("fusechat_pairwise", "callbacks=[default,eva_eval] +callbacks.eva_eval.limt=3", ["callbacks.eva_eval.limt", "limit"]),
    ("eval_addsub", "+logger.csv.nam=x", ["logger.csv.nam", "name"]),
    ("eval_addsub", "logger.csv.name={a:1}", ["logger.csv.name"]),
    ("fusechat_pairwise", "callbacks.model_checkpoint.dirpath=[1,2]", ["callbacks.model_checkpoint.dirpath=[1, 2]"]),
    ("fusechat_pairwise", "trainer.strategy=banana", ["trainer.strategy='banana'", "ddp"]),  # Lightning's registry
    ("fusechat_pairwise", "trainer=fsdp trainer.strategy.state_dict_type=banana",  # a nested target's Literal
     ["trainer.strategy.state_dict_type='banana'", "sharded"]),
    ("fusechat_pairwise", "trainer=deepspeed_z2 +trainer.strategy.stag=3", ["trainer.strategy.stag", "stage"]),
    # **kwargs a target forwards (fusionlab.targets.KWARGS_FORWARDED_TO): typed by the callable they reach
    ("eval_addsub", "logger=wandb +logger.wandb.grup=x", ["logger.wandb.grup", "group"]),  # -> wandb.init
    ("eval_addsub", "logger=wandb logger.wandb.mode=onlin", ["logger.wandb.mode='onlin'", "offline"]),
    ("eval_addsub", "logger=wandb logger.wandb.tags=[1,2]", ["logger.wandb.tags=[1, 2]", "Sequence[str]"]),
    ("fusechat_pairwise", "trainer=ddp +trainer.strategy.find_unused_parameter=true",  # -> torch's DDP
     ["trainer.strategy.find_unused_parameter", "find_unused_parameters"]),
    ("fusechat_pairwise", "trainer=ddp trainer.strategy.find_unused_parameters=maybe",
     ["trainer.strategy.find_unused_parameters='maybe'", "bool"]),
    ("fusechat_pairwise", "trainer=fsdp trainer.strategy.sharding_strategy=FULL",  # -> torch's FSDP, an enum
     ["trainer.strategy.sharding_strategy='FULL'", "FULL_SHARD", "HYBRID_SHARD"]),
    ("fusechat_pairwise", "trainer=fsdp trainer.strategy.limit_all_gathers=maybe",
     ["trainer.strategy.limit_all_gathers='maybe'", "bool"]),
    ("fusechat_pairwise", "callbacks=[default,metrics] +callbacks.metrics.layerz=3",  # -> MetricConfig
     ["callbacks.metrics.layerz", "layers"]),
    ("fusechat_pairwise", "callbacks=[default,metrics] callbacks.metrics.limit=0",  # MetricConfig's own check
     ["callbacks.metrics", "limit=0", ">= 1"]),
    ("fusechat_pairwise", "callbacks=[default,metrics] callbacks.metrics.max_length=abc",
     ["callbacks.metrics.max_length='abc'", "int"]),
    ("fusechat_pairwise", "callbacks=[default,chat_vector] +callbacks.chat_vector.special_tokens_map={a:1}",
     ["callbacks.chat_vector.special_tokens_map={'a': 1}", "dict[int, int]"]),  # element types
    ("fusechat_pairwise", "trainer.val_check_interval=2.5", ["trainer.val_check_interval=2.5", "(0, 1]"]),
    ("fusechat_pairwise", "trainer.val_check_interval={minutez:5}", ["trainer.val_check_interval", "minutes"]),
    ("fusechat_pairwise", "trainer=fsdp trainer.strategy.auto_wrap_policy=transformer",  # Lightning's _POLICY
     ["trainer.strategy.auto_wrap_policy='transformer'", "_target_", "ModuleWrapPolicy"]),
]


def test_a_wrap_policy_node_is_accepted_and_checked_as_its_own_target(tmp_path):
    policy = "{_target_:torch.distributed.fsdp.wrap.ModuleWrapPolicy,module_classes:[]}"
    validate(_compose(["+experiment=fusechat_pairwise", "trainer=fsdp", f"trainer.strategy.auto_wrap_policy={policy}"],
                      tmp_path / "ok"))
    misspelt = policy.replace("module_classes", "module_clases")
    with pytest.raises(FusionlabError, match="module_clases.*did you mean module_classes"):
        validate(_compose(["+experiment=fusechat_pairwise", "trainer=fsdp",
                           f"trainer.strategy.auto_wrap_policy={misspelt}"], tmp_path / "bad"))


@pytest.mark.parametrize("experiment,override,needles", TARGET_CASES, ids=[c[1] for c in TARGET_CASES])
def test_target_nodes_refuse_bad_keys_and_values(tmp_path, experiment, override, needles):
    cfg = _compose([f"+experiment={experiment}", *override.split()], tmp_path)
    with pytest.raises(FusionlabError) as err:
        validate(cfg)
    message = str(err.value)
    assert all(needle in message for needle in needles), message
    assert "\n" not in message and "Traceback" not in message


def _target_nodes(node, where):
    """(dotted path, node) of every ``_target_`` node under a plain (to_object) config node."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield where, node
        for key, value in node.items():
            yield from _target_nodes(value, f"{where}.{key}")


TARGET_OPTIONS = [f"callbacks=[{','.join(p.stem for p in sorted((CONF_DIR / 'callbacks').glob('*.yaml')))}]",
                  *(f"trainer={p.stem}" for p in sorted((CONF_DIR / "trainer").glob("*.yaml"))),
                  *(f"scheduler={p.stem}" for p in sorted((CONF_DIR / "scheduler").glob("*.yaml"))),
                  *(f"logger={p.stem}" for p in sorted((CONF_DIR / "logger").glob("*.yaml")) if p.stem != "none")]



def _wrong_type(value):
    """A value of another type than ``value`` (and than anything a None-default key plausibly takes)."""
    if isinstance(value, bool):
        return "maybe"
    if isinstance(value, (int, float, list)):
        return "abc"
    return {"a": 1}  # str and None: a mapping no scalar parameter takes


@pytest.mark.parametrize("option", TARGET_OPTIONS)
def test_every_target_key_refuses_a_wrong_type(tmp_path, option):
    """Every key every shipped trainer / strategy / callback / scheduler / optimizer / logger node sets — those
    its target forwards through **kwargs included — refuses a value of the wrong type, naming the key."""
    cfg = _without_hydra(_compose(["+experiment=fusechat_pairwise", option], tmp_path))
    root, tried = validate(cfg), 0
    for top in ("trainer", "optimizer", "scheduler", "callbacks", "logger"):
        for where, node in _target_nodes(getattr(root, top), top):
            for key, value in node.items():
                if key.startswith("_") or isinstance(value, dict):
                    continue
                bad = _wrong_type(value)
                message = _refusal(cfg, f"{where}.{key}", bad)
                tried += 1
                assert message and f"{where}.{key}" in message, (where, key, bad, message)
    assert tried >= 3


@pytest.mark.parametrize("option", TARGET_OPTIONS)
def test_every_target_key_misspelt_is_refused_with_the_right_suggestion(tmp_path, option):
    """Every key every shipped trainer / callback / scheduler / optimizer / logger node sets, misspelt (a letter
    doubled), is refused naming the misspelt key and suggesting the real one — unless its target takes **kwargs
    that reach no signature (fusionlab.targets.KWARGS_FORWARDED_TO)."""
    import inspect

    from fusionlab.targets import _forwarded_signature, _qualnames, locate

    cfg = _without_hydra(_compose(["+experiment=fusechat_pairwise", option], tmp_path))
    root, tried = validate(cfg), 0
    for top in ("trainer", "optimizer", "scheduler", "callbacks", "logger"):
        for where, node in _target_nodes(getattr(root, top), top):
            target = locate(node["_target_"], where)
            forwarded = _forwarded_signature(_qualnames(target))  # **kwargs passed on are checked there
            params = (forwarded[1] if forwarded else inspect.signature(target)).parameters.values()
            if any(p.kind is p.VAR_KEYWORD for p in params):
                continue
            for key in (k for k in node if not k.startswith("_")):
                typo = key[0] + key  # "max_steps" -> "mmax_steps"
                message = _refusal(cfg, f"{where}.{typo}", node[key])
                tried += 1
                assert message and f"{where}.{typo}" in message and key in message, (where, typo, message)
    assert tried >= 5


def test_multirun_flag_after_the_overrides_is_honoured(tmp_path):
    """argparse refuses Hydra's -m after an override ("unrecognized arguments: task.limit=-1"); cli moves it first,
    so `+experiment=x -m a=1,2` sweeps as users type it (here its one job fails validation, as a multirun does)."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=eval_addsub", "-m", "task.limit=-1",
                           f"hydra.sweep.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "unrecognized arguments" not in proc.stderr
    assert "1 job(s) of the multirun failed" in proc.stderr and "task.limit=-1" in proc.stderr, proc.stderr[-2000:]


def test_override_syntax_error_names_the_override_without_noise(tmp_path):
    proc = fusionlab_run(["+experiment=eva_addsub", "ensemble.topk={a:1"], tmp_path / "run")
    assert proc.returncode == 2 and "{a:1" in proc.stderr, proc.stderr[-2000:]
    assert "None" not in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_ends_with_one_note_and_an_interrupted_record(tmp_path):
    """Ctrl-C (SIGINT) inside a job: exit 130, a short note naming the run dir instead of the traceback of wherever the
    job was, metrics.json marked interrupted, no final output (here stopped as predictions.jsonl is being written)."""
    import signal

    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "FUSIONLAB_TEST_PAUSE": "write:predictions.jsonl"}
    proc = subprocess.Popen([sys.executable, "-m", "fusionlab.run", "+experiment=eval_addsub", "task.limit=1",
                             "generation.max_new_tokens=4", "logger=none", f"hydra.run.dir={run_dir}"], cwd=REPO, env=env,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "paused write:predictions.jsonl" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, "".join(seen)[-2000:] + rest[-2000:]
    assert f"fusionlab: interrupted in {run_dir}" in rest and "Traceback" not in rest, rest[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text()) == {"job": "evaluate", "status": "interrupted",
                                                                  "error": "KeyboardInterrupt"}
    assert not (run_dir / "predictions.jsonl").exists()


def test_a_bad_wandb_mode_in_the_environment_is_named(tmp_path):
    """WANDB_MODE=bogus made W&B's settings model raise a pydantic ValidationError traceback."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "bogus"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "+experiment=eval_addsub", "task.limit=1",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WANDB_MODE='bogus'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "predictions.jsonl").exists()


def test_the_slurm_launcher_off_a_cluster_is_one_paragraph(tmp_path):
    """submitit raised RuntimeError('Could not detect "srun"') as a traceback before any job ran."""
    import shutil

    if shutil.which("srun"):
        pytest.skip("this machine has SLURM")
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "-m", "hydra/launcher=submitit_slurm",
                           "+experiment=eval_addsub", "task.limit=1,2", f"hydra.sweep.dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "submitit_slurm needs a SLURM cluster" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher", sorted(p.stem for p in (CONF_DIR / "hydra" / "launcher").glob("*.yaml")))
def test_every_shipped_launcher_passes_its_rules(tmp_path, launcher):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from fusionlab.run import register_configs
    from fusionlab.targets import check_target_node

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "+experiment=eval_addsub"],
                      return_hydra_config=True)
    node = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    node = {k: v for k, v in node.items() if not (isinstance(v, str) and "${" in v)}  # run-time interpolations
    check_target_node(node, "hydra.launcher")


@pytest.mark.parametrize("launcher,override,needle", [
    ("joblib", "hydra.launcher.n_jobs=0", "hydra.launcher.n_jobs=0 is not valid"),  # joblib's ValueError traceback
    ("submitit_local", "hydra.launcher.timeout_min=-5", "hydra.launcher.timeout_min=-5 is not valid"),
])
def test_a_bad_launcher_setting_stops_the_sweep_before_any_job(tmp_path, launcher, override, needle):
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "-m", f"hydra/launcher={launcher}", override,
                           "+experiment=eval_addsub", "task.limit=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").glob("[0-9]*")), "no job ran"


def test_an_optuna_search_of_zero_trials_stops_before_the_study(tmp_path):
    """hydra.sweeper.n_trials=0 made Optuna fail with 'Record does not exist' (a traceback) after creating optuna.db."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", "-m", "+experiment=eval_addsub", "+hparams_search=eva_optuna",
                           "hydra.sweeper.n_trials=0", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "hydra.sweeper.n_trials=0 must be an integer >= 1" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep" / "optuna.db").exists()


@pytest.mark.parametrize("experiment", ["fusechat_pairwise", "fusechat_merge"])
def test_wandb_refuses_before_the_distillation_prepares_anything(tmp_path, experiment):
    """The distill jobs started their W&B run only when the trainer was built, after the representations were
    extracted and the pivot scored: W&B without network (the GPU box) or with a bad mode failed minutes in."""
    env = {**os.environ, "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "bogus"}
    proc = subprocess.run([sys.executable, "-m", "fusionlab.run", f"+experiment={experiment}",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "WANDB_MODE='bogus'" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("split.json"))  # nothing of the pipeline ran
