"""Metrics on models and their outputs (Diff-eRank, ...)."""
from fusionlab.metrics.diff_erank import (DiffERankResult, DiffERankSettings, batched_entropy, dataset_eranks, erank,
                                          evaluate_diff_erank, load_texts, matrix_entropy, model_entropies,
                                          untrained_twin)

__all__ = ["DiffERankResult", "DiffERankSettings", "batched_entropy", "dataset_eranks", "erank",
           "evaluate_diff_erank", "load_texts", "matrix_entropy", "model_entropies", "untrained_twin"]
