"""The suite: its typed config, one forward pass for every metric and layer, batching/padding
invariance on a real (tiny) model, and the values equal to the metric functions applied by hand."""
from __future__ import annotations

import math

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.metrics.representation import (Tokens, curvature, dataset_entropy, dime, entropy_scale, infonce, lidar,
                                              nuclear_norm, pool_tokens, prompt_entropy)
from fusionlab.metrics.suite import (METRICS, MetricConfig, evaluate_model, measure, measure_twin, summarize,
                                     view_masks)

TINY = {"name": "tiny", "source": "random", "tokenizer": "smollm2_135m",
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2}}


def tiny_llama(seed: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def token_ids(lengths=(9, 3, 17, 2, 12, 30, 8)):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 97, (n,), generator=g).tolist() for n in lengths]


# ---------------------------------------------------------------------------------- config

def test_config_expands_the_suite_and_reads_defaults_from_the_functions():
    cfg = MetricConfig(metrics=["suite"])
    assert cfg.metrics == list(METRICS) and len(METRICS) == 7
    assert MetricConfig(metrics=["curvature", "suite"]).metrics[0] == "curvature"  # no duplicates
    assert MetricConfig(metrics="lidar").metrics == ["lidar"]
    import inspect

    assert cfg.lidar_delta == inspect.signature(lidar).parameters["delta"].default == 1e-4
    assert cfg.dime_permutations == inspect.signature(dime).parameters["permutations"].default
    assert cfg.infonce_temperature == inspect.signature(infonce).parameters["temperature"].default
    assert cfg.twin_metrics == ["diff_erank"] and MetricConfig(metrics=["lidar"]).twin_metrics == []


@pytest.mark.parametrize("kwargs,message", [
    ({"metrics": ["erank"]}, r"Unknown metric\(s\) \['erank'\].*'suite'"),
    ({"metrics": []}, "Unknown metric"),
    ({"alpha": 0}, r"metric.alpha=0 .*> 0"),
    ({"alpha": -2.0}, "metric.alpha=-2.0"),
    ({"batch_size": 0}, "metric.batch_size=0"),
    ({"max_length": 1}, "metric.max_length=1"),
    ({"views": 1}, "metric.views=1"),
    ({"normalization": "bits"}, "max_entropy"),
    ({"average": "median"}, "geometric"),
    ({"layers": "middle"}, "metric.layers='middle'"),
    ({"layers": []}, "metric.layers"),
    ({"layers": [0, 1.5]}, "metric.layers"),
    ({"texts": "/no/such/texts.jsonl"}, "/no/such/texts.jsonl"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(FusionlabError, match=message):
        MetricConfig(**kwargs)


# ---------------------------------------------------------------------------------- one pass, invariances

def test_one_forward_pass_serves_every_metric_and_layer():
    model = tiny_llama()
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    ids = token_ids()
    measure(model, ids, MetricConfig(metrics=["suite"], layers="all", batch_size=4))
    assert len(calls) == math.ceil(len(ids) / 4)  # one pass over the texts, whatever the metrics and layers


def test_batched_with_padding_equals_one_text_at_a_time():
    model, ids = tiny_llama(), token_ids()
    cfg = dict(metrics=["suite"], layers="all", nuclear_exact=True)
    batched = measure(model, ids, MetricConfig(**cfg, batch_size=7), keep_embeddings=True)
    single = measure(model, ids, MetricConfig(**cfg, batch_size=1), keep_embeddings=True)
    assert batched.layers == [0, 1, 2]
    assert set(batched.per_text) == {"entropy", "prompt_entropy", "curvature", "nuclear_norm", "nuclear_norm_exact"}
    assert set(batched.dataset) == {"dataset_entropy", "lidar", "dime", "infonce", "infonce_mi"}
    for key in batched.per_text:
        torch.testing.assert_close(batched.per_text[key], single.per_text[key], rtol=1e-5, atol=1e-7, equal_nan=True)
    for key in batched.dataset:
        torch.testing.assert_close(batched.dataset[key], single.dataset[key], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched.embeddings, single.embeddings, rtol=1e-5, atol=1e-6)
    assert math.isnan(float(batched.per_text["curvature"][0, 3]))  # the 2-token text has no curvature ...
    row = summarize(batched, None, MetricConfig(**{**cfg, "metrics": ["curvature"]}))[2]
    assert row["curvature"] == pytest.approx(float(torch.nanmean(batched.per_text["curvature"][2])))  # ... nor vote


def test_values_equal_the_functions_applied_by_hand():
    model, ids = tiny_llama(), token_ids()
    cfg = MetricConfig(metrics=["suite"], layers=[-1], views=4, alpha=2.0, normalization="log_d", seed=3)
    m = measure(model, ids, cfg, keep_embeddings=True)
    views = view_masks(ids, 4, seed=3)
    pooled = []
    with torch.no_grad():
        for i, x in enumerate(ids):
            h = model.model(input_ids=torch.tensor([x])).last_hidden_state  # the final (normed) hidden state
            t = Tokens(h)
            scale = math.log(32)
            assert float(m.per_text["prompt_entropy"][0, i]) == pytest.approx(float(prompt_entropy(t, 2.0)) / scale,
                                                                              rel=1e-5)
            assert float(m.per_text["entropy"][0, i]) == pytest.approx(float(prompt_entropy(t, 1.0)), rel=1e-5)
            assert float(m.per_text["nuclear_norm"][0, i]) == pytest.approx(float(nuclear_norm(t)) / len(x), rel=1e-5)
            if len(x) > 2:
                assert float(m.per_text["curvature"][0, i]) == pytest.approx(float(curvature(t)), rel=1e-5)
            pooled.append(pool_tokens(h, None, views[i].unsqueeze(0))[0])
    e = torch.stack(pooled)
    n = len(ids)
    assert float(m.dataset["dataset_entropy"][0]) == pytest.approx(
        dataset_entropy(e[:, 0], 2.0) / float(entropy_scale("log_d", n, 32)), rel=1e-4)
    assert float(m.dataset["lidar"][0]) == pytest.approx(lidar(e[:, 1:5], 2.0) / math.log(32), rel=1e-4)
    assert float(m.dataset["dime"][0]) == pytest.approx(dime(e[:, 1:3], 2.0, seed=3) / math.log(32), rel=1e-4)
    loss = infonce(e[:, 1:3])
    assert float(m.dataset["infonce"][0]) == pytest.approx(loss, rel=1e-4)
    assert float(m.dataset["infonce_mi"][0]) == pytest.approx(1 - loss / math.log(n), rel=1e-4)


def test_views_depend_only_on_seed_and_text():
    ids = token_ids()
    two, many = view_masks(ids, 2, seed=5), view_masks(ids, 16, seed=5)
    for a, b, x in zip(two, many, ids):
        assert torch.equal(a, b[:2]) and a.shape == (2, len(x))
        assert (a.sum(1) == (len(x) + 1) // 2).all()  # a random half of the tokens
    assert not all(torch.equal(a, b) for a, b in zip(two, view_masks(ids, 2, seed=6)))


def test_twin_values_and_layer_errors_before_any_pass():
    model, ids = tiny_llama(), token_ids()
    cfg = MetricConfig(metrics=["diff_erank", "curvature"], layers="all")
    twin = measure_twin(model.config, ids, cfg)
    assert set(twin.per_text) == {"entropy"}  # the twin runs only the metrics that need it
    rows = summarize(measure(model, ids, cfg), twin, cfg)
    assert rows[-1]["diff_erank"] == pytest.approx(rows[-1]["erank_untrained"] - rows[-1]["erank_trained"])
    calls = []
    model.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(FusionlabError, match=r"layer 3 does not exist.*0\.\.2"):
        measure(model, ids, MetricConfig(layers=[0, 3]))
    assert calls == []  # checked from the model's config, before the forward pass


def test_evaluate_model_end_to_end_on_a_tiny_random_model():
    texts = ["", "The cat sat on the mat.", "One two three four five six seven.", "A short text here, again."]
    result = evaluate_model({**TINY, "seed": 1}, texts, MetricConfig(metrics=["suite"], layers="all", max_length=32))
    flat = result.flat("tiny/")
    assert result.n_texts == 3 and result.n_skipped == 1 and result.layers == [0, 1, 2]
    for key in ("diff_erank", "prompt_entropy", "dataset_entropy", "curvature", "lidar", "dime", "infonce",
                "infonce_mi", "nuclear_norm", "layer0/lidar", "layer1/diff_erank"):
        assert math.isfinite(flat[f"tiny/{key}"]), key
    assert "tiny/nuclear_norm_exact" not in flat  # only with nuclear_exact
    assert flat["tiny/curvature"] == result.table[-1]["curvature"] == flat["tiny/layer2/curvature"]
    assert 0 < flat["tiny/prompt_entropy"] <= 1  # max_entropy normalisation


def test_subset_of_texts_and_layers_for_intervals():
    model, ids = tiny_llama(), token_ids()
    cfg = MetricConfig(metrics=["matrix_entropy", "curvature", "dime"], layers="all", views=2)
    m = measure(model, ids, cfg, keep_embeddings=True)
    same = m.subset(range(len(ids)), cfg)
    for key in m.dataset:
        torch.testing.assert_close(same.dataset[key], m.dataset[key], rtol=1e-12, atol=0)
    part = m.subset([5, 0, 2, 6], cfg, layers=[2])
    alone = measure(model, [ids[i] for i in (5, 0, 2, 6)], cfg, keep_embeddings=True)
    assert part.layers == [2]
    torch.testing.assert_close(part.per_text["curvature"][0], alone.per_text["curvature"][2], rtol=1e-5, atol=0,
                               equal_nan=True)
    # a subset's dataset values are those of a run on those texts alone; the views are seeded by a text's
    # position in the set, which differs between the two runs, so compare the view-free dataset entropy
    assert float(part.dataset["dataset_entropy"][0]) == pytest.approx(float(alone.dataset["dataset_entropy"][2]),
                                                                      rel=1e-5)
    assert set(m.subset([0, 1], cfg).dataset) == {"dataset_entropy", "dime"}
    no_embeddings = measure(model, ids, cfg).subset([0, 1, 2], cfg)
    assert no_embeddings.dataset == {} and no_embeddings.per_text["curvature"].shape == (3, 3)
