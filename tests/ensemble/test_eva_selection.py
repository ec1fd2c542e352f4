"""Member weights from dev scores (GaC's score normalisation) and the checks of the options that choose
them and the compatibility warm-up (the check itself runs in test_ensemble.py, on its shared fixtures)."""
from __future__ import annotations

import pytest
import torch

from fusionlab.ensemble import EnsembleConfig, linear_sum
from fusionlab.ensemble.evaluation import dev_score_weights
from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec

AUX = {"aux": ModelSpec(name="a", source="embedded", path="gemma3_270m")}


def test_dev_score_weights_hand_computed():
    assert dev_score_weights([0.3, 0.1]) == pytest.approx([0.25])  # main 0.75 = 0.3 / 0.4
    assert dev_score_weights([0.2, 0.2, 0.4]) == pytest.approx([0.25, 0.5])
    assert dev_score_weights([0.0, 0.0]) is None  # no information: equal weights
    # with linear_sum, the weights give GaC's score-weighted mixture: 0.75 p_main + 0.25 p_aux
    dists = torch.tensor([[[0.6, 0.4]], [[0.0, 1.0]]])
    mixed = linear_sum(dists, torch.ones(2, 1, dtype=torch.bool), weights=dev_score_weights([0.3, 0.1]))
    assert torch.allclose(mixed, torch.tensor([[0.45, 0.55]]))


@pytest.mark.parametrize("options,message", [
    ({"warmup": -1}, "ensemble.warmup=-1 must be >= 0"),
    ({"weights_from": "oracle", "combiner": "linear_sum"}, "ensemble.weights_from='oracle' is not one of \\['dev_score'\\]"),
    ({"weights_from": "dev_score"}, "use it with ensemble.combiner=linear_sum and ensemble.weights=null"),
    ({"weights_from": "dev_score", "combiner": "linear_sum", "weights": [0.5]}, "ensemble.weights=null"),
    ({"weights_from": "dev_score", "combiner": "linear_sum", "dev_examples": 0}, "ensemble.dev_examples=0 must be >= 1"),
])
def test_new_options_name_the_bad_value(options, message):
    with pytest.raises(FusionlabError, match=message):
        EnsembleConfig(aux=AUX, **options)
