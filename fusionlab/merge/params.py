"""Per-tensor parameter values, with mergekit's meanings.

A parameter value is one of:

- a scalar: used for every tensor;
- a list of numbers: a *gradient* interpolated over the layers, ``t = layer / (num_layers - 1)``
  (tensors outside the layers, e.g. embeddings, norms and lm_head, use ``t = 0``);
- a list of ``{filter: str, value: ...}``: the first entry whose ``filter`` is a substring of the
  tensor name (or is missing / ``"*"``) gives the value, which may itself be a gradient.

Precedence (highest first): the model's own ``parameters``, then the global ``parameters``,
then the method's default.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from fusionlab.errors import FusionlabError
from fusionlab.merge.registry import Parameter

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_t(tensor_name: str, num_layers: int | None) -> float:
    """Position of the tensor's layer in [0, 1] for gradients (0 outside the layer stack)."""
    m = _LAYER.search(tensor_name)
    if m is None or not num_layers:
        return 0.0
    if num_layers <= 1:
        return 1.0
    return int(m.group(1)) / (num_layers - 1)


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """Value of one setting for one tensor; ``None`` if no filter matches."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None:
        return setting
    if isinstance(setting, (list, tuple)):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        for cond in setting:
            if not isinstance(cond, Mapping) or "value" not in cond or set(cond) - {"filter", "value"}:
                raise FusionlabError(
                    f"Bad parameter entry {cond!r}: a list must hold only numbers (a layer gradient) or "
                    "only {filter: <substring of tensor names>, value: ...} entries."
                )
            f = cond.get("filter")
            if f is None or f == "*" or f in tensor_name:
                return evaluate(cond["value"], tensor_name, t)
        return None
    raise FusionlabError(f"Unexpected parameter value {setting!r} (type {type(setting).__name__}).")


def resolve(parameters: Iterable[Parameter], scopes: list[Mapping[str, Any] | None], tensor_name: str, t: float,
            who: str) -> dict[str, Any]:
    """Each parameter's value for one tensor (first scope that sets it wins, then its default), checked."""
    out = {}
    for p in parameters:
        value = None
        for scope in scopes:
            if scope and p.name in scope:
                value = evaluate(scope[p.name], tensor_name, t)
                if value is not None:
                    break
        if value is None:
            if p.required:
                raise FusionlabError(
                    f"Missing required merge parameter {p.name!r} for {who} at tensor {tensor_name!r}; "
                    f"set it under that model's parameters or the global merge.parameters."
                )
            value = p.default
        out[p.name] = p.check(value, f"{who} at tensor {tensor_name!r}")
    return out
