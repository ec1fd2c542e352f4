"""Model loading (HF, GGUF, embedded, random), chat prompts and batched generation; the one home of
model references, dtypes and devices (:mod:`fusionlab.models.resolve`)."""
from fusionlab.models.embedded import EMBEDDED_MODELS, cache_dir, embedded_checkpoint
from fusionlab.models.loading import ModelSpec, build_random_model, load_model, load_tokenizer
from fusionlab.models.resolve import DTYPES, resolve_checkpoint, resolve_device, torch_dtype

__all__ = ["DTYPES", "EMBEDDED_MODELS", "ModelSpec", "build_random_model", "cache_dir", "embedded_checkpoint",
           "load_model", "load_tokenizer", "resolve_checkpoint", "resolve_device", "torch_dtype"]
