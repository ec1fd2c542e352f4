"""Metrics on models and their outputs: the representation-metrics suite (Diff-eRank, matrix entropy,
curvature, LiDAR, DiME, InfoNCE, nuclear norm), per layer from one forward pass."""
from fusionlab.metrics.diff_erank import evaluate_diff_erank, model_entropies
from fusionlab.metrics.representation import (Tokens, curvature, dataset_entropy, dataset_eranks, dime, erank,
                                              infonce, lidar, matrix_entropy, nuclear_norm, prompt_entropy)
from fusionlab.metrics.suite import METRICS, MetricConfig, MetricsResult, evaluate_model, measure, untrained_twin

__all__ = ["METRICS", "MetricConfig", "MetricsResult", "Tokens", "curvature", "dataset_entropy", "dataset_eranks",
           "dime", "erank", "evaluate_diff_erank", "evaluate_model", "infonce", "lidar",
           "matrix_entropy", "measure", "model_entropies", "nuclear_norm", "prompt_entropy", "untrained_twin"]
