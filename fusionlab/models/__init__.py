"""Model loading (HF, GGUF, embedded, random), chat prompts and batched generation."""
from fusionlab.models.embedded import EMBEDDED_MODELS, cache_dir, embedded_checkpoint
from fusionlab.models.loading import ModelSpec, build_random_model, load_model, load_tokenizer

__all__ = ["EMBEDDED_MODELS", "ModelSpec", "build_random_model", "cache_dir", "embedded_checkpoint",
           "load_model", "load_tokenizer"]
