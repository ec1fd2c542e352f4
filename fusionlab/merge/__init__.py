"""Weight-space merging: mergekit-compatible methods, a streaming engine, Chat Vector.

    from fusionlab.merge import MergeConfig, merge
    merge(MergeConfig(method="ties", base="smollm2_135m", output="out",
                      models=[{"model": "ft_a", "parameters": {"weight": 1, "density": 0.5}}]))

Where things live: ``methods`` (one function per method, registered by ``registry`` from its
signature), ``config`` (the typed ``merge:`` node), ``engine`` (plan, then stream), ``params``
(per-tensor values: gradients, filters), ``io`` (safetensors reader and the one shard writer),
``chat_vector``, ``derive`` (the experiments' derived checkpoints and text sets),
``mergekit_yaml``; ``fast/`` fences the speed and memory tricks.
"""
from fusionlab.merge import methods as _methods  # noqa: F401  (registers the built-in methods)
from fusionlab.merge.config import InputModel, MergeConfig
from fusionlab.merge.engine import MergePlan, merge, plan
from fusionlab.merge.registry import METHODS, Method, PerModel, get_method, merge_method
from fusionlab.models.resolve import resolve_checkpoint

__all__ = ["InputModel", "METHODS", "MergeConfig", "MergePlan", "Method", "PerModel", "get_method", "merge",
           "merge_method", "plan", "resolve_checkpoint"]
