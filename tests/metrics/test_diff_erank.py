"""Diff-eRank: the fast eRank against a direct fp64 SVD, its invariants, batching, the twin, and bad input."""
from __future__ import annotations

import math

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.metrics.diff_erank import evaluate_diff_erank, model_entropies
from fusionlab.metrics.representation import Tokens, dataset_eranks, erank, matrix_entropy, prompt_entropy
from fusionlab.metrics.suite import MetricConfig, tokenize, untrained_twin
from fusionlab.tasks.texts import load_text_set

TINY = {"name": "tiny", "source": "random", "tokenizer": "smollm2_135m",
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2}}


def svd_entropy(rep: torch.Tensor) -> float:
    """The paper's formula, written out: d x d covariance of centered unit rows, SVD in float64."""
    r = rep.to(torch.float64)
    z = r - r.mean(0)
    z = z / z.norm(dim=1, keepdim=True)
    cov = z.T @ z / z.shape[0]
    s = torch.linalg.svdvals(cov / torch.trace(cov))
    return float(-(s * torch.log(s)).nansum())


def tiny_llama(seed: int = 0, vocab: int = 97, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# ---------------------------------------------------------------------------------------- the math

@pytest.mark.parametrize("n,d", [(40, 96), (150, 48), (64, 64)])
def test_equals_fp64_svd_of_covariance(n, d):
    torch.manual_seed(n + d)
    rep = torch.randn(n, d) @ torch.randn(d, d)  # correlated features: a non-trivial spectrum
    assert matrix_entropy(rep) == pytest.approx(svd_entropy(rep), rel=1e-9)


def test_orthonormal_rows_have_erank_n():
    q, _ = torch.linalg.qr(torch.randn(80, 12, dtype=torch.float64))
    rows = q.T  # 12 orthonormal rows in 80 dimensions
    assert erank(rows, center=False) == pytest.approx(12, rel=1e-12)
    # centering removes exactly one direction and leaves the rest equal
    assert erank(rows) == pytest.approx(11, rel=1e-12)


def test_rank_one_data_has_erank_one():
    v = torch.randn(50, dtype=torch.float64)
    a = torch.randn(30, 1, dtype=torch.float64)
    assert erank(a * v) == pytest.approx(1.0, abs=1e-9)


def test_rotation_and_token_order_invariance():
    torch.manual_seed(1)
    rep = torch.randn(70, 40, dtype=torch.float64)
    rot, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    h = matrix_entropy(rep)
    assert matrix_entropy(rep @ rot) == pytest.approx(h, rel=1e-10)
    assert matrix_entropy(rep[torch.randperm(70)]) == pytest.approx(h, rel=1e-10)


@pytest.mark.parametrize("d", [16, 200])  # padded batch through the covariance and through the Gram path
def test_padding_never_enters_the_value(d):
    torch.manual_seed(d)
    lengths = [5, 37, 2, 20]
    reps = [torch.randn(n, d) for n in lengths]
    batch = torch.full((4, max(lengths), d), float("nan"))  # garbage, even NaN, at padded positions
    mask = torch.zeros(4, max(lengths), dtype=torch.bool)
    for i, r in enumerate(reps):
        batch[i, :len(r)] = r
        mask[i, :len(r)] = True
    got = prompt_entropy(Tokens(batch, mask))
    want = torch.tensor([matrix_entropy(r) for r in reps], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_dataset_averages():
    h = torch.tensor([math.log(4.0), math.log(16.0)])
    geo, arith = dataset_eranks(h)
    assert geo == pytest.approx(8.0) and arith == pytest.approx(10.0)  # reference: exp(mean H); mean eRank


# ---------------------------------------------------------------------------------------- models

def test_batched_model_pass_equals_one_by_one():
    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (9, 3, 17, 2, 12)]
    layers, batched = model_entropies(model, ids, layers="all", batch_size=5)
    _, single = model_entropies(model, ids, layers="all", batch_size=1)
    assert layers == [0, 1, 2] and batched.shape == (3, 5)
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=0)
    _, last = model_entropies(model, ids, layers="last", batch_size=2)
    _, neg = model_entropies(model, ids, layers=[-1], batch_size=2)
    torch.testing.assert_close(last, batched[-1:], rtol=1e-5, atol=0)
    torch.testing.assert_close(neg, last)
    # "last" is the base model's final (normed) output, what the reference reads
    with torch.no_grad():
        hs = model.model(input_ids=torch.tensor([ids[2]])).last_hidden_state[0]
    assert last[0, 2].item() == pytest.approx(matrix_entropy(hs), rel=1e-6)


def test_untrained_twin_is_reproducible_for_a_seed():
    config = tiny_llama().config
    a, b, c = untrained_twin(config, seed=3), untrained_twin(config, seed=3), untrained_twin(config, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    ids = [[5, 9, 11, 40, 2, 7]]
    assert torch.equal(model_entropies(a, ids)[1], model_entropies(b, ids)[1])


def test_evaluate_tiny_random_model_against_its_twin():
    texts = ["", "Hi", *load_text_set(stop=3)]
    same = evaluate_diff_erank(TINY, texts, MetricConfig(layers="all", seed=0, max_length=48))
    m = same.flat("tiny/")
    assert m["tiny/n_texts"] == 3 and m["tiny/n_skipped"] == 2  # "" and "Hi" have < 2 tokens (no BOS)
    assert m["tiny/layer"] == 2 and len(same.rows("tiny")) == 3
    assert m["tiny/diff_erank"] == 0.0  # a random model with the twin's seed IS its twin
    other = evaluate_diff_erank({**TINY, "seed": 1}, texts, MetricConfig(seed=0, max_length=48, average="arithmetic"))
    m = other.flat("t/")
    assert m["t/diff_erank"] == m["t/diff_erank_arith"] != 0.0
    assert m["t/diff_erank_arith"] == pytest.approx(m["t/erank_untrained_arith"] - m["t/erank_trained_arith"])
    assert m["t/erank_trained_geo"] <= m["t/erank_trained_arith"]  # AM-GM


# ---------------------------------------------------------------------------------------- bad input

def test_nan_representations_are_an_error_not_zero():
    rep = torch.randn(6, 8)
    rep[3, 2] = float("nan")
    with pytest.raises(FusionlabError, match="NaN"):
        matrix_entropy(rep)
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
    with pytest.raises(FusionlabError, match=r"hidden state 1.*NaN"):
        model_entropies(model, [[4, 5, 6]], layers="all")


def test_degenerate_and_short_inputs():
    with pytest.raises(FusionlabError, match="identical"):
        matrix_entropy(torch.ones(5, 4))
    with pytest.raises(FusionlabError, match="at least 2 tokens"):
        matrix_entropy(torch.randn(1, 4))
    with pytest.raises(FusionlabError, match="fewer than 2 tokens"):
        model_entropies(tiny_llama(), [[1, 2], [3]])


def test_empty_text_sets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(FusionlabError, match="empty"):
        load_text_set(empty)
    with pytest.raises(FusionlabError, match="does not exist"):
        load_text_set(tmp_path / "missing.jsonl")
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"content": "x"}\n')
    with pytest.raises(FusionlabError, match="no field 'text'"):
        load_text_set(wrong)
    with pytest.raises(FusionlabError, match="empty"):
        model_entropies(tiny_llama(), [])
    from fusionlab.models import ModelSpec, load_tokenizer

    tok = load_tokenizer(ModelSpec(source="embedded", path="smollm2_135m"))
    with pytest.raises(FusionlabError, match="All 2 metric texts have fewer than 2 tokens"):
        tokenize(tok, ["", "a"])


def test_model_without_hidden_states():
    class Plain(torch.nn.Module):  # forward() knows nothing of output_hidden_states
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)

        def forward(self, input_ids):
            return self.emb(input_ids)

    class NoStates(Plain):
        def forward(self, input_ids, attention_mask=None, output_hidden_states=False, use_cache=False):
            return {"logits": self.emb(input_ids)}

    for model in (Plain(), NoStates()):
        with pytest.raises(FusionlabError, match="hidden states"):
            model_entropies(model, [[1, 2, 3]])


def test_bad_settings_name_the_key():
    with pytest.raises(TypeError, match="layer_s"):  # unknown keys: a TypeError here, a FusionlabError from Hydra
        MetricConfig(layer_s="all")
    with pytest.raises(FusionlabError, match="median"):
        MetricConfig(average="median")
    with pytest.raises(FusionlabError, match="layer 7 does not exist"):
        model_entropies(tiny_llama(), [[1, 2, 3]], layers=[7])
