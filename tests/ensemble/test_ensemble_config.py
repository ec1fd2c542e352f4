"""The typed ``ensemble`` node: each bad value fails with its name, and through the CLI in seconds,
before any model loads."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fusionlab.ensemble import DecodingOptions, EnsembleConfig, EvaDecoder
from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec

AUX = {"aux": ModelSpec(name="a", source="embedded", path="gemma3_270m")}


@pytest.mark.parametrize("options,message", [
    ({"topk": 0}, "ensemble.topk=0 must be >= 1"),
    ({"drop": -1}, "ensemble.drop=-1 must be >= 1"),
    ({"combiner": "unifrom"}, "ensemble.combiner='unifrom' is not one of \\['confidence', 'linear_sum', 'uniform'\\]"),
    ({"candidates": "all"}, "ensemble.candidates='all' is not one of \\['own', 'union'\\]"),
    ({"gate": "sometimes"}, "ensemble.gate='sometimes' is not one of"),
    ({"sync": "bytes"}, "ensemble.sync='bytes'"),
    ({"gate": "confidence", "gate_threshold": 1.5}, "gate_threshold=1.5 must be in \\[0, 1\\]"),
    ({"gate": "confidence", "gate_threshold": -0.1}, "gate_threshold=-0.1 must be in \\[0, 1\\]"),
    ({"gate_threshold": 0.5}, "no effect with ensemble.gate='always'; it applies to \\['confidence'\\]"),
    ({"weights": [0.5]}, "no effect with ensemble.combiner='uniform'; it applies to \\['linear_sum'\\]"),
    ({"combiner": "linear_sum", "weights": [-0.5]}, "must be >= 0 and sum to at most 1"),
    ({"combiner": "linear_sum", "weights": [0.7, 0.6]}, "must be >= 0 and sum to at most 1"),
    ({"do_sample": True, "temperature": 0.0}, "temperature=0.0 must be > 0 when sampling"),
    ({"temperature": 0.7}, "temperature=0.7 has no effect with greedy decoding"),
    ({"threads": 0}, "ensemble.threads=0 must be >= 1"),
    ({"window": 0}, "ensemble.window=0 must be >= 1"),
])
def test_decoding_options_name_the_bad_value(options, message):
    with pytest.raises(FusionlabError, match=message):
        DecodingOptions(**options)


def test_ensemble_config_checks_its_own_options():
    with pytest.raises(FusionlabError, match="ensemble.aux is empty"):
        EnsembleConfig()
    with pytest.raises(FusionlabError, match="2 values for 1 aux models"):
        EnsembleConfig(aux=AUX, combiner="linear_sum", weights=[0.2, 0.2])
    with pytest.raises(FusionlabError, match="batch_size=0"):
        EnsembleConfig(aux=AUX, batch_size=0)
    cfg = EnsembleConfig(aux=AUX, combiner="linear_sum", weights=[1.0], topk=40)
    assert cfg.decoding() == DecodingOptions(combiner="linear_sum", weights=[1.0], topk=40)


def test_decoder_checks_weights_against_its_aux_models(tiny_pair):
    from fusionlab.align import Alignment

    (m, t), _ = tiny_pair
    ident = Alignment.identity(m.get_output_embeddings().weight.shape[0])
    with pytest.raises(FusionlabError, match="2 values for 1 aux models"):
        EvaDecoder((m, t), [(m, t)], [ident], combiner="linear_sum", weights=[0.2, 0.2])


def test_threads_never_oversubscribe_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert DecodingOptions().member_threads(2) == max(1, cores // 2)
    assert DecodingOptions().member_threads(3) * 3 <= max(cores, 3)
    assert DecodingOptions(parallel=False).member_threads(2) == cores
    assert DecodingOptions(threads=3).member_threads(2) == 3


@pytest.mark.parametrize("override,named", [("ensemble.combiner=nosuch", "ensemble.combiner='nosuch'"),
                                            ("ensemble.topk=0", "ensemble.topk=0"),
                                            ("ensemble.drop=-1", "ensemble.drop=-1"),
                                            ("ensemble.gate=confidence ensemble.gate_threshold=2", "gate_threshold=2.0"),
                                            ("ensemble.weights_from=dev_score", "ensemble.combiner=linear_sum"),
                                            ("task.split=sometimes", "task.split='sometimes'"),
                                            # dev scores need a dev part that is never reported: checked at job start
                                            ("ensemble.combiner=linear_sum ensemble.weights_from=dev_score task.split=all",
                                             "task.split='all' leaves 0")])
def test_cli_refuses_bad_values_before_loading_a_model(tmp_path, override, named):
    cache = tmp_path / "cache"  # an empty model cache: loading a model would convert it into here
    cache.mkdir()
    cmd = [sys.executable, "-m", "fusionlab.run", "+experiment=eva_addsub", *override.split(), "logger=none",
           f"hydra.run.dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "FUSIONLAB_CACHE": str(cache)})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "fusionlab: error:" in res.stderr and named in res.stderr
    assert "Traceback" not in res.stderr
    assert list(cache.iterdir()) == []  # no model was converted or loaded, no alignment built
