"""Weight-space merging: mergekit-compatible methods, a streaming engine, Chat Vector.

    from fusionlab.merge import MergeConfig, merge
    merge(MergeConfig.from_dict({"method": "ties", "base": "smollm2_135m", "output": "out",
                                 "models": [{"model": "ft_a", "parameters": {"weight": 1, "density": 0.5}}]}))
"""
from fusionlab.merge.engine import InputModel, MergeConfig, merge, plan, resolve_checkpoint
from fusionlab.merge.methods import METHODS, Method, get_method

__all__ = ["InputModel", "METHODS", "Method", "MergeConfig", "get_method", "merge", "plan", "resolve_checkpoint"]
