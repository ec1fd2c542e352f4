"""Checks for the ``_target_`` config nodes (trainer, optimizer, scheduler, callbacks, logger) before any work.

Those nodes are instantiated by Hydra, so no dataclass types them: a misspelt key or a bad value would
otherwise surface deep inside Lightning or torch after the models have loaded. Each node's keys are checked
against its target's own signature (the callable is the schema, as mergekit reads a method's parameters
from its signature), its annotations give the types (where they can be judged), and :data:`VALUE_RULES` holds the ranges of the
values users actually set. Library code: works on plain dicts (``OmegaConf.to_object`` of the config).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import enum
import importlib
import inspect
import math
import os
import pathlib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fusionlab.errors import FusionlabError

TARGET_NODES = ("trainer", "optimizer", "scheduler", "callbacks", "logger")
HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")


def locate(path: str, where: str) -> Any:
    """The object a dotted ``_target_`` names (longest importable module prefix, then attributes)."""
    if not isinstance(path, str) or not path or any(not part.isidentifier() for part in path.split(".")):
        raise FusionlabError(f"{where}._target_={path!r} is not a dotted Python path; give the class or function to "
                             "build, e.g. lightning.Trainer or torch.optim.AdamW.")
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name and (module_name == err.name or module_name.startswith(err.name + ".")):
                continue  # this prefix is not a module: try a shorter one
            raise FusionlabError(f"{where}._target_={path!r} cannot be imported: {err}. Install the missing "
                                 "package or choose another target.") from err
        except Exception as err:  # noqa: BLE001 -- the module itself fails to import
            raise FusionlabError(f"{where}._target_={path!r} cannot be imported: {type(err).__name__}: {err}.") from err
        for j, attr in enumerate(parts[i:], start=i):
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                close = difflib.get_close_matches(attr, names, n=3)
                raise FusionlabError(f"{where}._target_={path!r}: {'.'.join(parts[:j])} has no {attr!r}"
                                     f"{f'; did you mean {close}?' if close else '.'} Fix the target's spelling.")
            obj = getattr(obj, attr)
        return obj
    raise FusionlabError(f"{where}._target_={path!r}: no module {parts[0]!r} is installed; fix the target's "
                         "spelling or install the package that provides it.")


# -- value rules: (target, key) -> check, written once -----------------------------------------------------------

def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _devices_ok(v: Any) -> bool:
    """Lightning's ``devices``: a count, -1 (all), "auto", a list of indices, or those as a string ("2", "0,1")."""
    if isinstance(v, str):
        v = v.strip()
        return v in ("auto", "-1") or re.fullmatch(r"\d+(,\d+)*,?", v) is not None and v != "0"
    if isinstance(v, (list, tuple)):
        return len(v) > 0 and all(_integer(d) and d >= 0 for d in v)
    return _integer(v) and (v >= 1 or v == -1)


_TIMEDELTA_KEYS = ("weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds")


def _val_check_interval_ok(v: Any) -> bool:
    """Lightning's ``val_check_interval``: batches (int >= 1), a fraction of an epoch (0, 1], or a duration
    ("DD:HH:MM:SS", or timedelta's keyword arguments as a dict)."""
    if v is None or _integer(v):
        return v is None or v >= 1
    if isinstance(v, float):
        return 0 < v <= 1
    if isinstance(v, str):
        return re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", v.strip()) is not None
    return (isinstance(v, dict) and len(v) > 0 and set(v) <= set(_TIMEDELTA_KEYS)
            and all(_integer(n) and n >= 0 for n in v.values()))


def _strategies() -> list[str]:
    names = ["auto"]
    try:
        from lightning.pytorch.strategies import StrategyRegistry
        names += StrategyRegistry.available_strategies()
    except (ImportError, AttributeError):
        pass
    return names


def _precisions() -> list[Any]:
    """Lightning's own accepted ``precision`` values (its Literal type), flattened."""
    try:
        from lightning.fabric.connector import _PRECISION_INPUT
        return [v for arg in typing.get_args(_PRECISION_INPUT) for v in typing.get_args(arg)]
    except (ImportError, AttributeError):  # another Lightning version: its documented set
        return [64, 32, 16, "64", "32", "16", "bf16", "transformer-engine", "transformer-engine-float16", "16-true",
                "16-mixed", "bf16-true", "bf16-mixed", "32-true", "64-true"]


def _accelerators() -> list[str]:
    names = ["cpu", "gpu", "cuda", "mps", "tpu", "auto"]
    try:
        from lightning.pytorch.accelerators import AcceleratorRegistry
        names += [n for n in AcceleratorRegistry.available_accelerators() if n not in names]
    except (ImportError, AttributeError):
        pass
    return names


@dataclass(frozen=True)
class Rule:
    ok: Callable[[Any], bool]
    allowed: str | Callable[[], str]  # what is allowed, for the message (a callable: computed when needed)


def _in(choices: Callable[[], list[Any]]) -> Rule:
    return Rule(lambda v: not isinstance(v, bool) and v in choices(), lambda: f"one of {choices()}")


POSITIVE = Rule(lambda v: _number(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: _number(v) and v >= 0, "a number >= 0")
FRACTION = Rule(lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]")
STEPS = Rule(lambda v: _integer(v) and (v >= 1 or v == -1), "an integer >= 1, or -1 for no limit")
AT_LEAST_ONE = Rule(lambda v: _integer(v) and v >= 1, "an integer >= 1")
OPTIONAL_AT_LEAST_ONE = Rule(lambda v: v is None or _integer(v) and v >= 1, "an integer >= 1, or null")
BETAS = Rule(lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v),
             "two numbers in [0, 1), e.g. [0.9, 0.999]")

TRAINERS = ("lightning.pytorch.trainer.trainer.Trainer", "pytorch_lightning.trainer.trainer.Trainer")
OPTIMIZERS = ("torch.optim.optimizer.Optimizer",)
CHECKPOINTS = ("lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
               "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint")
WARMUP_COSINE = ("fusionlab.distill.module.warmup_cosine",)
FSDP = ("lightning.pytorch.strategies.fsdp.FSDPStrategy",)
JOBLIB = ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",)
SUBMITIT = ("hydra_plugins.hydra_submitit_launcher.submitit_launcher.BaseSubmititLauncher",)

# (qualified names of the target or one of its base classes, {key: rule}); only keys present are checked
VALUE_RULES: list[tuple[tuple[str, ...], dict[str, Rule]]] = [
    (TRAINERS, {
        "max_steps": STEPS, "max_epochs": STEPS, "accumulate_grad_batches": AT_LEAST_ONE,
        "gradient_clip_val": Rule(lambda v: v is None or _number(v) and v >= 0, "a number >= 0, or null for none"),
        "devices": Rule(_devices_ok, "an integer >= 1 (-1: all), \"auto\", a list of device indices or a string of "
                                     "them (\"0,1\")"),
        "num_nodes": AT_LEAST_ONE, "log_every_n_steps": AT_LEAST_ONE,
        "val_check_interval": Rule(_val_check_interval_ok, "an integer >= 1 (batches), a number in (0, 1] (a fraction "
                                   "of an epoch), a duration \"DD:HH:MM:SS\", a dict of timedelta's keywords "
                                   f"({', '.join(_TIMEDELTA_KEYS)}), or null"),
        "precision": _in(_precisions), "accelerator": _in(_accelerators),
        "strategy": Rule(lambda v: not isinstance(v, str) or v in _strategies(), lambda: f"one of {_strategies()}, or "
                         "a strategy node with a _target_ (conf/trainer/ddp.yaml)"),
    }),
    # Lightning annotates it with a name it imports only for type checkers (_POLICY): judged here instead. From a
    # config a policy can only be built by a node with a _target_ (a nested node is checked as its own target).
    (FSDP, {"auto_wrap_policy": Rule(lambda v: v is None, "null (fusionlab wraps the trained model's decoder layers) "
                                     "or a node with a _target_ that builds the policy (e.g. torch.distributed.fsdp."
                                     "wrap.ModuleWrapPolicy)")}),
    (OPTIMIZERS, {"lr": POSITIVE, "weight_decay": NON_NEGATIVE, "betas": BETAS, "eps": POSITIVE}),
    (WARMUP_COSINE, {"warmup_ratio": FRACTION, "min_lr_ratio": FRACTION}),
    # Hydra's launchers (hydra.launcher, checked when a multirun starts): joblib's n_jobs=0 and submitit's
    # non-positive sizes fail inside the plugin as tracebacks, after the sweep began
    (JOBLIB, {"n_jobs": Rule(lambda v: _integer(v) and v != 0, "an integer >= 1, or negative (-1: one job per core)")}),
    (SUBMITIT, {"timeout_min": AT_LEAST_ONE, "nodes": OPTIONAL_AT_LEAST_ONE, "tasks_per_node": OPTIONAL_AT_LEAST_ONE,
                "cpus_per_task": OPTIONAL_AT_LEAST_ONE, "array_parallelism": OPTIONAL_AT_LEAST_ONE,
                "mem_gb": Rule(lambda v: v is None or _number(v) and v > 0, "a number > 0, or null"),
                "gpus_per_node": Rule(lambda v: v is None or _integer(v) and v >= 0, "an integer >= 0, or null")}),
    (CHECKPOINTS, {"every_n_train_steps": Rule(lambda v: v is None or _integer(v) and v >= 0, "an integer >= 0 (0: off)"),
                   "save_top_k": Rule(lambda v: _integer(v) and v >= -1, "an integer >= -1 (-1: keep all)")}),
]


# Targets that pass their ``**kwargs`` on to another callable: that callable's signature types those keys, so a
# misspelt or wrong-typed one is refused here instead of after the models load (or never, inside wandb.init).
KWARGS_FORWARDED_TO: dict[str, str] = {
    "lightning.pytorch.loggers.wandb.WandbLogger": "wandb.init",
    "lightning.pytorch.strategies.ddp.DDPStrategy": "torch.nn.parallel.DistributedDataParallel",
    "lightning.pytorch.strategies.fsdp.FSDPStrategy": "torch.distributed.fsdp.FullyShardedDataParallel",
    "fusionlab.callbacks.metrics.RepresentationMetricsCallback": "fusionlab.metrics.suite.MetricConfig",
}


def _qualnames(target: Any) -> set[str]:
    objs = target.__mro__ if inspect.isclass(target) else (target,)
    return {f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', '')}" for o in objs}


# -- types from the annotations ----------------------------------------------------------------------------------

_SEQUENCES = (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.MutableSequence,
              collections.abc.Iterable, collections.abc.Collection, collections.abc.Set)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def accepts(annotation: Any, value: Any) -> bool:
    """Whether a config value (str, number, bool, None, list, dict) fits ``annotation``. Conservative: an
    annotation it cannot judge (Any, Callable, a type var, a library class) accepts every scalar, and refuses only
    a list or a dict (without ``_target_``), which no such parameter can take from a config."""
    if annotation is inspect.Parameter.empty or annotation is Any or isinstance(annotation, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(accepts(a, value) for a in typing.get_args(annotation))
    if annotation is type(None) or annotation is None:
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return _integer(value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (pathlib.Path, pathlib.PurePath, os.PathLike) or origin is os.PathLike:
        return isinstance(value, str)
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):  # Lightning and torch take member names
        return (isinstance(value, str) and value.upper() in {m.upper() for m in annotation.__members__}
                or any(type(value) is type(m.value) and value == m.value for m in annotation))
    container, args = origin or annotation, typing.get_args(annotation)
    if container in _SEQUENCES:
        item = args[0] if len(args) == 1 or len(args) == 2 and args[1] is Ellipsis else None
        return isinstance(value, (list, tuple)) and (item is None or all(accepts(item, v) for v in value))
    if container in _MAPPINGS:
        return isinstance(value, dict) and (len(args) != 2 or all(accepts(args[0], k) and accepts(args[1], v)
                                                                  for k, v in value.items()))
    if inspect.isclass(annotation) and isinstance(value, annotation):
        return True
    return not isinstance(value, (list, tuple, dict)) or isinstance(value, dict) and "_target_" in value


def _annotations(target: Any, signature: inspect.Signature | None) -> dict[str, Any]:
    """Each parameter's annotation, evaluated (``from __future__ import annotations`` leaves strings); one that
    names what is only imported for type checkers stays unknown, the others are still checked."""
    function = target.__init__ if inspect.isclass(target) else target
    try:
        return typing.get_type_hints(function)
    except Exception:  # noqa: BLE001 -- some forward reference does not resolve: evaluate them one by one
        pass
    namespace = {**vars(typing), **getattr(inspect.unwrap(function), "__globals__", {})}
    hints = {}
    for name, param in (signature.parameters.items() if signature else ()):
        annotation = param.annotation
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 -- the library's own annotation text
            except Exception:  # noqa: BLE001
                continue
        hints[name] = annotation
    return hints


# -- the check ------------------------------------------------------------------------------------------------------

def check_target_node(node: dict[str, Any], where: str) -> None:
    """Refuse keys ``node``'s ``_target_`` does not take, values of the wrong simple type, and out-of-range values."""
    target = locate(node["_target_"], where)
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check keys against
        signature = None
    hints = _annotations(target, signature)
    names = _qualnames(target)
    rules = {k: r for owners, table in VALUE_RULES if names & set(owners) for k, r in table.items()}
    params = dict(signature.parameters) if signature else {}
    takes_any = signature is None or any(p.kind is p.VAR_KEYWORD for p in params.values())
    own_params = set(params)
    forwarded = _forwarded_signature(names) if takes_any and signature is not None else None
    if forwarded is not None:  # its **kwargs are the forwarded callable's parameters: check those keys too
        forwarded_callable, forwarded_signature, forwarded_hints = forwarded
        params = {**forwarded_signature.parameters, **params}
        hints = {**forwarded_hints, **hints}
        takes_any = any(p.kind is p.VAR_KEYWORD for p in forwarded_signature.parameters.values())
    valid = [n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    for key, value in node.items():
        if key in HYDRA_KEYS:
            continue
        full = f"{where}.{key}"
        if key not in params and not takes_any:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else f"its parameters are {valid}."
            raise FusionlabError(f"{full} is not a parameter of {node['_target_']} ({where}._target_); {hint} "
                                 f"Fix the key's spelling, or remove it (~{full} on the command line).")
        if isinstance(value, dict) and "_target_" in value:  # an object built first (trainer.strategy)
            check_target_node(value, full)
            continue
        if key in rules and not rules[key].ok(value):
            allowed = rules[key].allowed
            raise FusionlabError(f"{full}={value!r} is not valid: {node['_target_']}'s {key} must be "
                                 f"{allowed() if callable(allowed) else allowed}; set {full}=<value>.")
        annotation = hints.get(key, inspect.Parameter.empty)
        if annotation is inspect.Parameter.empty and key in params and isinstance(params[key].default, bool):
            annotation = bool  # an unannotated flag (torch's DDP find_unused_parameters=False)
        if not accepts(annotation, value):
            raise FusionlabError(f"{full}={value!r} has the wrong type: {node['_target_']}'s {key} takes "
                                 f"{_describe(annotation)}; set {full}=<value>.")
    if forwarded is not None and dataclasses.is_dataclass(forwarded_callable):  # its own value checks, now
        settings = {k: v for k, v in node.items() if k not in HYDRA_KEYS and k not in own_params}
        try:
            forwarded_callable(**settings)
        except FusionlabError as err:
            raise FusionlabError(f"{where} ({node['_target_']}): {err}") from None


def _describe(annotation: Any) -> str:
    """An annotation as a person reads it; an enum lists the member names the config may give."""
    members = [a for a in (typing.get_args(annotation) or (annotation,))
               if inspect.isclass(a) and issubclass(a, enum.Enum)]
    names = [name for a in members for name in a.__members__]
    nullable = type(None) in typing.get_args(annotation)
    return inspect.formatannotation(annotation) + (f" (one of {names}{', or null' if nullable else ''})"
                                                   if names else "")


def _forwarded_signature(names: set[str]) -> tuple[Callable, inspect.Signature, dict[str, Any]] | None:
    """The signature and annotations of the callable a target forwards its ``**kwargs`` to (KWARGS_FORWARDED_TO);
    None when there is none or it cannot be imported (then any key passes, as before)."""
    path = next((KWARGS_FORWARDED_TO[n] for n in names if n in KWARGS_FORWARDED_TO), None)
    if path is None:
        return None
    try:
        callable_ = locate(path, path)
        signature = inspect.signature(callable_)
    except (FusionlabError, TypeError, ValueError):
        return None
    return callable_, signature, _annotations(callable_, signature)


def check_targets(nodes: dict[str, Any]) -> None:
    """Check every ``_target_`` node under the given top-level nodes (``{"trainer": {...}, "callbacks": ...}``):
    the node itself, each named entry (callbacks, loggers) and nested targets (``trainer.strategy``)."""
    for name, node in nodes.items():
        _walk(node, name)


def _walk(node: Any, where: str) -> None:
    if isinstance(node, dict):
        if "_target_" in node:
            check_target_node(node, where)
            return
        for key, value in node.items():
            _walk(value, f"{where}.{key}")
