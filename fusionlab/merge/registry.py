"""The merge-method registry: a method is one function, and its signature is its parameter list.

    @merge_method(min_models=2)
    def model_stock(base: Tensor, tensors: list[Tensor], *, filter_wise: bool = False) -> Tensor:
        ...

A method function merges ONE tensor: ``base`` is the base model's tensor (``None`` for a method
registered with ``base="input"``, where the base is one more input; ``None`` too for
``base="optional"`` when no base is set), ``tensors`` the other models' tensors (the compute dtype,
fp32 by default; same shape). Its keyword-only parameters are the method's parameters, read here
once (mergekit's ``easy_define`` idea), so each default is written once, in the signature:

- ``PerModel[T]``: one value per model (from that model's ``parameters`` or the global ones); the
  function receives the list, in the order of ``tensors``;
- any other annotation (``float``, ``int``, ``bool``, ``str`` or a ``Literal`` of choices, each
  possibly ``| None``): one value for all models;
- no default: required (mergekit's convention);
- a trailing underscore is dropped from the name users write (``lambda_`` is ``lambda``);
- a parameter called ``generator`` is not a user option: the method is random and gets a
  :class:`torch.Generator` seeded per tensor.

The value of every parameter is checked (type, choices) when a merge is planned, before any tensor
is read; a name the signature does not have is an error naming it.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
import types
from typing import Annotated, Any, Callable, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import torch

from fusionlab.errors import FusionlabError

T = TypeVar("T")


class _PerModelMarker:
    def __repr__(self) -> str:
        return "PER_MODEL"


PER_MODEL = _PerModelMarker()
PerModel = Annotated[list[T], PER_MODEL]  # PerModel[float]: one float per model; the function gets the list
REQUIRED = inspect.Parameter.empty  # the default of a parameter that has none
# the base model is required | is one more weighted input (linear) | is used when set (nuslerp, multislerp)
BASES = ("required", "input", "optional")
GENERATOR = "generator"


@dataclass(frozen=True)
class Parameter:
    """One parameter of a merge method, as its signature states it."""

    name: str  # as configs write it
    arg: str  # the function's keyword (``lambda_`` for ``lambda``)
    type: Any  # float | int | bool | str | Literal[...]
    default: Any  # REQUIRED when there is none
    per_model: bool

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> Any:
        """``value`` as this parameter's type (ints accepted for floats), else an error naming both."""
        kind = self.type
        if get_origin(kind) in (Union, types.UnionType) and type(None) in get_args(kind):  # ``T | None``
            if value is None:
                return None
            kind = next(a for a in get_args(kind) if a is not type(None))
        return Parameter(self.name, self.arg, kind, self.default, self.per_model)._check(value, where)

    def _check(self, value: Any, where: str) -> Any:
        choices = get_args(self.type) if get_origin(self.type) is Literal else None
        if choices is not None:
            ok = value in choices and isinstance(value, str)
            want = f"one of {list(choices)}"
        elif self.type is bool:
            ok = isinstance(value, bool)
            want = "true or false"
        elif self.type is float:  # NaN/inf would only surface as a NaN tensor after the inputs are read
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
            want = "a finite number"
        elif self.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        else:
            ok = isinstance(value, self.type)
            want = f"a {self.type.__name__}"
        if not ok:
            raise FusionlabError(f"Merge parameter {self.name!r} = {value!r} in {where} must be {want}.")
        return value


@dataclass(frozen=True)
class Method:
    """A registered merge method: its function, its parameters and what inputs it takes."""

    name: str
    fn: Callable[..., torch.Tensor]
    parameters: tuple[Parameter, ...]
    base: str = "required"  # one of BASES
    min_models: int = 1  # models besides the base (for base="input": all inputs, the base being one)
    max_models: int | None = None
    random: bool = False  # takes a seeded generator
    weight_sum: str | None = None  # the switch under which it divides by Σ weight unguarded (a zero sum: NaN/inf)

    @property
    def shared(self) -> dict[str, Any]:
        """Name → default of the parameters with one value for all models."""
        return {p.name: p.default for p in self.parameters if not p.per_model}

    @property
    def per_model(self) -> dict[str, Any]:
        """Name → default of the parameters with one value per model."""
        return {p.name: p.default for p in self.parameters if p.per_model}

    @property
    def summary(self) -> str:
        return (inspect.getdoc(self.fn) or "").split("\n\n")[0]

    def check_names(self, settings: Mapping[str, Any] | None, where: str, one_model: bool = False) -> None:
        """Fail on a parameter the method does not have (a typo would otherwise be silently ignored),
        on a shared one set for ``one_model``, and on a plain value of the wrong type or choice
        (gradients and filter lists are checked per tensor, when the merge is planned)."""
        names = {p.name: p for p in self.parameters}
        unknown = sorted(set(settings or {}) - set(names))
        if unknown:
            raise FusionlabError(f"Unknown parameter(s) {unknown} for merge method {self.name!r} in {where}; "
                                 f"valid parameters are {sorted(names)}.")
        shared = sorted(k for k in settings or {} if one_model and not names[k].per_model)
        if shared:
            raise FusionlabError(f"Parameter(s) {shared} of merge method {self.name!r} in {where} take one value for "
                                 f"all models: set them under merge.parameters (per model: {sorted(self.per_model)}).")
        for key, value in (settings or {}).items():
            if isinstance(value, (bool, int, float, str)):
                names[key].check(value, where)

    def apply(self, base: torch.Tensor | None, tensors: list[torch.Tensor], shared: Mapping[str, Any],
              per_model: list[Mapping[str, Any]], generator: torch.Generator | None = None) -> torch.Tensor:
        """Merge one tensor with resolved values (``shared``: name → value; ``per_model``: one such dict per
        input tensor)."""
        kwargs = {p.arg: [m[p.name] for m in per_model] if p.per_model else shared[p.name] for p in self.parameters}
        if self.random:
            kwargs[GENERATOR] = generator
        return self.fn(base, tensors, **kwargs)


METHODS: dict[str, Method] = {}


def _parameter(arg: inspect.Parameter, hint: Any, method: str) -> Parameter:
    if arg.kind is not inspect.Parameter.KEYWORD_ONLY:
        raise TypeError(f"merge method {method}: parameter {arg.name!r} must be keyword-only (after *)")
    if hint is None:
        raise TypeError(f"merge method {method}: parameter {arg.name!r} needs a type annotation")
    per_model = get_origin(hint) is Annotated and PER_MODEL in get_args(hint)[1:]
    value_type = get_args(get_args(hint)[0])[0] if per_model else hint
    return Parameter(arg.name.rstrip("_"), arg.name, value_type, arg.default, per_model)


def merge_method(fn: Callable[..., torch.Tensor] | None = None, *, name: str | None = None, base: str = "required",
                 min_models: int = 1, max_models: int | None = None, weight_sum: str | None = None):
    """Register ``fn`` as the merge method ``name`` (default: the function's name); see the module docstring."""

    def register(f: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        method = name or f.__name__
        if base not in BASES:
            raise TypeError(f"merge method {method}: base={base!r}, use one of {BASES}")
        if method in METHODS:
            raise TypeError(f"merge method {method!r} is registered twice")
        args = list(inspect.signature(f).parameters.values())
        if [a.name for a in args[:2]] != ["base", "tensors"] or any(a.kind is inspect.Parameter.KEYWORD_ONLY
                                                                   for a in args[:2]):
            raise TypeError(f"merge method {method}: the function must start with (base, tensors, *, ...)")
        hints = get_type_hints(f, include_extras=True)
        options = [a for a in args[2:] if a.name != GENERATOR]
        METHODS[method] = Method(method, f, tuple(_parameter(a, hints.get(a.name), method) for a in options),
                                 base=base, min_models=min_models, max_models=max_models,
                                 random=any(a.name == GENERATOR for a in args[2:]), weight_sum=weight_sum)
        return f

    return register(fn) if fn is not None else register


def get_method(name: str) -> Method:
    import fusionlab.merge.methods  # noqa: F401  (registers the built-in methods)

    if name not in METHODS:
        raise FusionlabError(f"Unknown merge method {name!r}; use one of {sorted(METHODS)} (conf/merge_method/).")
    return METHODS[name]


__all__ = ["METHODS", "Method", "Parameter", "PerModel", "REQUIRED", "get_method", "merge_method"]
