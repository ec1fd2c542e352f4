"""fusionlab: fuse large language models — EVA ensembles, FuseChat distillation, merging, Diff-eRank."""
__version__ = "0.1.0"
