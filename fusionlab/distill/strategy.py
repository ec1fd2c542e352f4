"""Sharded fits (FSDP, DeepSpeed) of the distill and implicit paths: checked at job start, wrapped by the
pivot's own decoder layer, exported as one consolidated Hugging Face directory.

- :func:`check_strategy_devices`: FSDP and DeepSpeed need GPUs; without one the job stops *before* any
  representation is extracted or model loaded, naming the trainer config and the fix.
- :func:`configure_wrap_policy`: FSDP wraps each decoder layer of the model actually trained — the
  classes its ``_no_split_modules`` names (LlamaDecoderLayer, Gemma3DecoderLayer, Qwen2DecoderLayer,
  ...) — unless the trainer config gives its own ``auto_wrap_policy``.
- :func:`export_consolidated`: the trained weights gathered from every rank (FSDP full state dict,
  DeepSpeed ZeRO-3 ``GatheredParameters``) and written by rank 0 with ``save_pretrained``, so
  ``fusechat_merge``, ``evaluate`` and the callbacks load it like any other checkpoint.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

SHARDED = ("FSDPStrategy", "DeepSpeedStrategy")


def check_strategy_devices(strategy_target: str | None, accelerator: str | None, gpus: int | None = None) -> None:
    """Refuse an FSDP / DeepSpeed trainer on a machine without GPUs (``gpus``: the visible count, for tests)."""
    name = (strategy_target or "").rsplit(".", 1)[-1]
    if name not in SHARDED:
        return
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if gpus == 0 or (accelerator or "gpu") == "cpu":
        raise FusionlabError(f"trainer.strategy={name} shards the model over GPUs, but this machine has {gpus} "
                             f"visible GPU(s) (accelerator={accelerator!r}); use trainer=cpu (one process) or "
                             "trainer=ddp with trainer.accelerator=cpu here, and fsdp / deepspeed_z2 / deepspeed_z3 "
                             "/ deepspeed_z3_offload on a GPU machine.")


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The module classes a transformers model says must not be split (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        raise FusionlabError(f"Cannot find the decoder-layer class of {type(model).__name__} for FSDP "
                             f"(_no_split_modules={sorted(names)}); set trainer.strategy.auto_wrap_policy.")
    return found


def configure_wrap_policy(trainer, model: torch.nn.Module) -> None:
    """Give an FSDP strategy without an ``auto_wrap_policy`` one that wraps ``model``'s decoder layers."""
    strategy = trainer.strategy
    if type(strategy).__name__ != "FSDPStrategy" or strategy.kwargs.get("auto_wrap_policy") is not None:
        return
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    classes = decoder_layer_classes(model)
    strategy.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
    log.info("FSDP wraps %s", sorted(c.__name__ for c in classes))


def full_state_dict(trainer, module) -> dict[str, torch.Tensor] | None:
    """The LightningModule's full state dict, gathered from every rank (call on all ranks; rank 0 gets it)."""
    strategy = trainer.strategy
    kind = type(strategy).__name__
    if kind == "FSDPStrategy":
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(strategy.model, StateDictType.FULL_STATE_DICT, cfg):
            state = strategy.model.state_dict()
        return state if trainer.is_global_zero else None
    if kind == "DeepSpeedStrategy":
        import deepspeed

        state = {}
        for name, param in module.named_parameters():  # ZeRO-3 partitions parameters: gather one at a time
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if trainer.is_global_zero:
                    state[name] = param.detach().to("cpu", copy=True)
        if trainer.is_global_zero:
            state.update({n: b.detach().cpu() for n, b in module.named_buffers()})
        return state if trainer.is_global_zero else None
    return module.state_dict()


def export_consolidated(trainer, module, hf_model, tokenizer, out_dir: Path, prefix: str = "model.") -> bool:
    """Write the trained ``hf_model`` (the module's ``prefix`` sub-module) as one HF dir; True on rank 0."""
    from fusionlab.io import atomic_dir

    state = full_state_dict(trainer, module)
    if state is None:
        return False
    state = {k.removeprefix("_forward_module."): v for k, v in state.items()}  # (a DeepSpeed engine's wrapper)
    state = {k.removeprefix(prefix): v.to("cpu") for k, v in state.items() if k.startswith(prefix)}
    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return True


def export_model(trainer, module, hf_model, tokenizer, out_dir: Path) -> bool:
    """The trained pivot as a plain HF dir from any strategy (gathered first when sharded); True where written."""
    if type(trainer.strategy).__name__ in SHARDED:
        return export_consolidated(trainer, module, hf_model, tokenizer, out_dir)
    if not trainer.is_global_zero:
        return False
    from fusionlab.io import atomic_dir

    with atomic_dir(Path(out_dir), overwrite=True) as tmp:
        hf_model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return True


def strategy_name(trainer: Any) -> str:
    return type(trainer.strategy).__name__
