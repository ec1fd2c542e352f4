"""Where a model is and what it runs in: the one model-reference, dtype and device resolvers.

Every area names models, dtypes and devices the same way, so each is resolved here once:

- a model reference is an embedded model's name, a local HF directory, a checkpoint file
  (GGUF, safetensors), ``derived:<name>`` (a checkpoint another step built, looked up in the
  ``derived`` map its caller passes), or — where the caller allows it — a hub id;
- a dtype is a key of :data:`DTYPES`;
- a device is ``auto``, ``cpu``, ``cuda``, ``cuda:N`` (any form ``torch.device`` parses).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from fusionlab.errors import FusionlabError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
    "float64": torch.float64, "fp64": torch.float64,  # merges may write fp64
}
DERIVED_PREFIX = "derived:"


def torch_dtype(name: str, key: str = "dtype") -> torch.dtype:
    """The torch dtype called ``name``; ``key`` names the config option in the error."""
    if name not in DTYPES:
        raise FusionlabError(f"Unknown {key} {name!r}; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def check_device(device: str, key: str = "device") -> str:
    """``device`` if it is ``auto`` or a form ``torch.device`` parses (whether that device exists is
    checked by :func:`resolve_device`, on the machine that runs the job)."""
    if device != "auto":
        try:
            kind = torch.device(device).type
        except (RuntimeError, TypeError):
            raise FusionlabError(f"{key}={device!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
        if kind not in ("cpu", "cuda"):  # mps, xpu, meta, …: torch parses them, fusionlab does not run there
            raise FusionlabError(f"{key}={device!r}: fusionlab runs models on the CPU or a CUDA GPU only; use auto, "
                                 "cpu, cuda or cuda:N.")
    return device


def resolve_device(device: str, key: str = "device") -> torch.device:
    """``auto`` → the GPU when one is visible, else the CPU; a CUDA device that is not there is an error."""
    check_device(device, key)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FusionlabError(f"{key}={device!r} but no CUDA GPU is visible; use {key}=cpu.")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise FusionlabError(f"{key}={device!r} but only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                             f"(cuda:0 … cuda:{torch.cuda.device_count() - 1}); pick one of them or {key}=cuda.")
    return resolved


def looks_like_hub_id(ref: str) -> bool:
    """``org/name`` (or ``name``) that cannot be a local path: no leading ``. / ~``, at most one slash."""
    return not ref.startswith((".", "/", "~")) and ref.count("/") <= 1 and not Path(ref).expanduser().exists()


def resolve_checkpoint(ref: str, derived: Mapping[str, str | Path] | None = None, *, allow_hub: bool = False,
                       what: str = "Model") -> Path | str:
    """The checkpoint ``ref`` names: a local directory or file (a Path), or the hub id itself (a str)
    when ``allow_hub`` and ``ref`` looks like one. Embedded models are converted on first use."""
    from fusionlab.models.embedded import EMBEDDED_MODELS, embedded_checkpoint

    if ref.startswith(DERIVED_PREFIX):
        name = ref.removeprefix(DERIVED_PREFIX)
        if not derived or name not in derived:
            raise FusionlabError(f"{what} {ref!r} is not a derived checkpoint of this run (defined: "
                                 f"{sorted(derived or {})}); define {name!r} under the job's `derive:` block.")
        return Path(derived[name]).expanduser()
    if ref in EMBEDDED_MODELS:
        return embedded_checkpoint(ref)
    path = Path(ref).expanduser()
    if path.exists():
        return path
    if allow_hub and looks_like_hub_id(ref):
        return ref
    raise FusionlabError(
        f"{what} {ref!r} is neither an embedded model ({', '.join(sorted(EMBEDDED_MODELS))}), "
        f"{'a derived:<name>, ' if derived else ''}an existing local checkpoint directory or file"
        f"{' nor a hub id (org/name)' if allow_hub else ''}; check the path."
    )
