"""The composed config's typed schema: one dataclass per config node, checked before any work.

Hydra merges every YAML file onto :class:`RootConfig` (registered in the ConfigStore by
:mod:`fusionlab.run` as ``fusionlab_schema``, the first entry of ``conf/config.yaml``'s defaults),
so an unknown key or a value of the wrong type fails at compose time, naming the key. Value
checks (ranges, choices, paths) live in each library dataclass's ``__post_init__``, written once;
:func:`validate` runs them all by building the typed objects, before a job loads any model. One rule is
config-wide instead: no number anywhere in the config may be NaN or inf (unless its field says it may).

The node dataclasses belong to the library areas that consume them (``ModelSpec`` in
``fusionlab.models``, ``EnsembleConfig`` in ``fusionlab.ensemble`` ...); this module only puts
them together. Nodes typed ``dict[str, Any]`` are instantiated by Hydra (``_target_``:
trainer, callbacks, optimizer, scheduler, logger): :mod:`fusionlab.targets` checks their keys against
each target's signature and their values against a small table of ranges, also in :func:`validate`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf, ValueNode, open_dict
from omegaconf.errors import OmegaConfBaseException

from fusionlab.align.methods import ALIGN_METHODS, AlignOptions
from fusionlab.distill.config import DistillConfig, FuseChatMergeConfig
from fusionlab.ensemble.config import EnsembleConfig
from fusionlab.errors import FusionlabError, traceback_frames
from fusionlab.merge.chat_vector import ChatVectorConfig
from fusionlab.merge.config import MergeConfig
from fusionlab.merge.lora import ExtractLoraConfig
from fusionlab.merge.tokenizer import TokenSurgeonConfig
from fusionlab.metrics.suite import MetricConfig
from fusionlab.models.generation import GenerationConfig
from fusionlab.models.loading import ModelSpec
from fusionlab.targets import TARGET_NODES, check_targets
from fusionlab.tasks import TaskConfig


@dataclass
class PathsConfig:
    root_dir: str = "."
    log_dir: str = "logs"
    output_dir: str = "???"


@dataclass
class RootConfig:
    """Everything ``python -m fusionlab.run`` composes (less Hydra's own ``hydra:`` node)."""

    job: str = "evaluate"  # a key of fusionlab.run.JOBS
    seed: int | None = 42
    objective: str | None = None  # metrics.json key returned to sweepers (Optuna maximises/minimises it)
    resume_mismatch: str = "refuse"  # refuse | allow: resume a checkpoint whose run had a config that changes results
    paths: PathsConfig = field(default_factory=PathsConfig)
    model: ModelSpec = field(default_factory=ModelSpec)
    task: TaskConfig = field(default_factory=TaskConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    logger: dict[str, Any] | None = None
    # job-specific nodes: present only when an experiment (or the command line) composes them
    ensemble: EnsembleConfig | None = None
    align_method: AlignOptions | None = None  # each method's own options class (GROUP_SCHEMAS)
    distill: DistillConfig | None = None
    fusechat_merge: FuseChatMergeConfig | None = None
    merge: MergeConfig | None = None
    chat_vector: ChatVectorConfig | None = None
    tokensurgeon: TokenSurgeonConfig | None = None
    extract_lora: ExtractLoraConfig | None = None
    metric: MetricConfig | None = None
    models: dict[str, ModelSpec] | None = None  # jobs that compare several models (diff_erank)
    # _target_ nodes (and logger above): typed by their target's own signature, checked by fusionlab.targets
    trainer: dict[str, Any] | None = None
    callbacks: dict[str, Any] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.seed is not None and not 0 <= self.seed <= 2**32 - 1:  # Lightning would pick a random seed instead
            raise FusionlabError(f"seed={self.seed} must be in [0, 2**32 - 1] (numpy's range), or null for no seeding.")
        if self.resume_mismatch not in RESUME_MISMATCH:
            raise FusionlabError(f"resume_mismatch={self.resume_mismatch!r} is not one of {list(RESUME_MISMATCH)}; "
                                 "refuse (default) stops a resume whose saved config differs, allow resumes anyway.")


RESUME_MISMATCH = ("refuse", "allow")


# Group options typed by their own dataclass, stored in the ConfigStore as (group, name): the option's
# YAML lists ``<name>`` first in its defaults (conf/align_method/vecmap_csls.yaml: vecmap_csls_schema).
GROUP_SCHEMAS: dict[tuple[str, str], type] = {("align_method", f"{name}_schema"): method.options
                                              for name, method in ALIGN_METHODS.items()}


def validate(cfg: DictConfig) -> RootConfig:
    """Build the typed config, running every node's value checks; a bad value is a FusionlabError."""
    if "hydra" in cfg:  # composed with return_hydra_config (tests): Hydra's own node is not ours to check
        cfg = cfg.copy()
        with open_dict(cfg):
            del cfg["hydra"]
    _check_keys_and_numbers(cfg, "")
    try:
        root = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        missing = _missing_keys(cfg, "")
        if missing:
            raise FusionlabError(f"missing required value(s): {', '.join(missing)} (??? in the config); set "
                                 f"{'each' if len(missing) > 1 else 'it'} on the command line, e.g. "
                                 f"{missing[0]}=<value>.") from err
        raise FusionlabError(config_error_message(err)) from err
    check_targets({name: getattr(root, name) for name in TARGET_NODES})  # keys vs signatures, value ranges
    return root


# The metadata key of a dataclass field for which NaN or inf is a meaningful setting (none is, so far):
# ``field(default=..., metadata={NON_FINITE: True})``; every other number in the config must be finite.
NON_FINITE = "non_finite"


def _check_keys_and_numbers(node: Any, where: str, default: Any = None, finite: bool = True) -> None:
    """One walk of the composed config before any ``__post_init__`` runs. Keys force-added (``+key=value``) to a
    typed node pass composition; they are still typos. A NaN or inf number is refused wherever it sits (a typed
    option, a list element, a ``_target_`` node, a merge parameter): NaN passes every range check written as
    ``if x < low: raise``, and either would surface only as NaN losses, weights or logits after the models load."""
    if isinstance(node, ValueNode):
        value = node._value()
        if finite and isinstance(value, float) and not math.isfinite(value):
            hint = f" (its default is {default})" if isinstance(default, (int, float)) else ""
            raise FusionlabError(f"{where}={value} is not a finite number: NaN and inf are not valid settings here. "
                                 f"Set {where} to a finite number{hint}.")
        return
    if node._is_none() or node._is_missing():
        return
    if isinstance(node, DictConfig):
        typ = OmegaConf.get_type(node)
        fields = {f.name: f for f in dataclasses.fields(typ)} if dataclasses.is_dataclass(typ) else {}
        if fields:
            unknown = sorted(set(node.keys()) - set(fields))
            if unknown:
                raise FusionlabError(f"unknown option(s) {unknown} in {where or 'the config'}; valid options are "
                                     f"{sorted(fields)}.")
        children = [(key, node._get_node(key), f"{where}.{key}" if where else str(key)) for key in node.keys()]
    else:
        fields, children = {}, [(None, node._get_node(i), f"{where}[{i}]") for i in range(len(node))]
    for key, child, full in children:
        if child._is_missing() or child._is_interpolation():  # an interpolation's target is checked where it sits
            continue
        spec = fields.get(key)
        _check_keys_and_numbers(child, full, spec.default if spec is not None else None,
                                finite and not (spec is not None and spec.metadata.get(NON_FINITE)))


def _missing_keys(node: Any, where: str) -> list[str]:
    """The ``???`` values under ``node``, found without resolving interpolations (one may point at a missing value)."""
    if node is None or not OmegaConf.is_config(node) and not hasattr(node, "_is_missing"):
        return []
    if node._is_missing():
        return [where]
    if node._is_none() or node._is_interpolation():
        return []
    if isinstance(node, DictConfig):
        return [k for key in node.keys() for k in _missing_keys(node._get_node(key), f"{where}.{key}" if where else str(key))]
    if OmegaConf.is_list(node):
        return [k for i in range(len(node)) for k in _missing_keys(node._get_node(i), f"{where}[{i}]")]
    return []


def override_on_null_message(err: AssertionError) -> str | None:
    """Hydra asserts (instead of raising) when a command-line override sets a key under a node that is null in the
    composed config (``trainer.max_steps=3`` for a job whose ``trainer`` is null). The override, from Hydra's own
    frame: a paragraph naming it and the null node; None for any other AssertionError."""
    frame = next((f for f in traceback_frames(err) if f.f_code.co_name == "_apply_overrides_to_config"), None)
    if frame is None or "override" not in frame.f_locals:
        return None
    override, cfg = frame.f_locals["override"], frame.f_locals.get("cfg")
    key = str(getattr(override, "key_or_group", ""))
    parts = key.split(".")
    null = next((".".join(parts[:i]) for i in range(1, len(parts))
                 if cfg is not None and OmegaConf.select(cfg, ".".join(parts[:i]), default=None) is None), parts[0])
    return (f"{override.input_line} cannot be applied: this experiment sets {null} to null (its job does not use it). "
            f"Remove the override; to set it anyway, first give {null} a value ({null}=<option> for a config group; "
            "conf/ lists the options).")


DICT_FOR_TYPED_ENTRY = re.compile(r"Error merging override \+?(?P<key>[\w.]+)=.*?Invalid type assigned: dict is not a "
                                  r"subclass of (?P<type>\w+)\..*?full_key: (?P<entry>[\w.]+)", re.S)


def typed_entry_literal_message(text: str) -> str | None:
    """OmegaConf refuses a ``{...}`` literal or a dotted key as a NEW entry of a dict of typed nodes
    (``+ensemble.aux.x={source: hf, path: ...}``): say how such an entry is added instead."""
    match = DICT_FOR_TYPED_ENTRY.search(text)
    if match is None:
        return None
    parts, name, kind = match["key"].split("."), match["entry"].split(".")[-1], match["type"]
    node = ".".join(parts[:parts.index(name) + 1]) if name in parts else match["key"]
    if kind == "ModelSpec":
        fix = (f"add it from the model group, then set its fields: +model@{node}=hf {node}.path=<dir or hub id> "
               f"(or +model@{node}=<a conf/model name>, e.g. gemma3_270m)")
    else:
        fix = ("write the entry in an experiment YAML (conf/experiment/; e.g. the derive: section of chat_vector.yaml) "
               "and run that experiment")
    return (f"{node}: a new {kind} entry cannot be given as a {{...}} literal or a dotted key on the command line "
            f"(OmegaConf refuses a dict for a typed {kind}); {fix}.")


def config_error_message(err: BaseException) -> str:
    """One paragraph from an OmegaConf/Hydra composition error: what is wrong, with which key, and the fix."""
    causes = []
    e: BaseException | None = err
    while e is not None and len(causes) < 5:
        causes.append(e)
        e = e.__cause__ or e.__context__
    literal = typed_entry_literal_message(" ".join(str(c) for c in causes))
    if literal is not None:
        return literal
    parts = []
    for c in causes:
        text = str(c).strip()
        if isinstance(c, FusionlabError):
            return text
        text = text.split("\nConfig search path")[0]
        text = re.sub(r"\s*\n\s*", "; ", text).replace(":; ", ": ")
        text = re.sub(r"; (object_type|reference_type|ref_type)=[^;]*", "", text)
        if text and text != "None" and "$VALUE" not in text and text not in " ".join(parts):  # antlr's causes print None
            parts.append(text)
    msg = " — ".join(parts) or type(err).__name__
    return (f"bad configuration: {msg}. Check the key and value named here (python -m fusionlab.run --cfg job "
            "prints the composed config; conf/ lists every group's options).")
