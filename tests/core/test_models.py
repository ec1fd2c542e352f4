"""Model loading (random, embedded, GGUF), prompts and batched generation."""
from __future__ import annotations


import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.models import ModelSpec, embedded_checkpoint, load_model
from fusionlab.models.chat import render_prompt
from fusionlab.models.embedded import EMBEDDED_MODELS
from fusionlab.models.generation import generate, truncate_at_stop

TINY = {"name": "tiny", "source": "random", "tokenizer": "smollm2_135m",
        "config": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2}}


def test_random_model_is_seeded_and_sized():
    m1, tok = load_model(TINY)
    m2, _ = load_model(TINY)
    m3, _ = load_model({**TINY, "seed": 1})
    assert m1.config.vocab_size == len(tok) == 49152
    assert m1.config.num_hidden_layers == 2
    p1, p2, p3 = (next(m.parameters()) for m in (m1, m2, m3))
    assert torch.equal(p1, p2) and not torch.equal(p1, p3)


def test_spec_errors_name_the_bad_value(tmp_path):
    with pytest.raises(FusionlabError, match="hidden_sizes"):
        ModelSpec.from_dict({"name": "x", "hidden_sizes": 3})
    with pytest.raises(FusionlabError, match=str(tmp_path / "nope")):
        load_model({"name": "x", "source": "hf", "path": str(tmp_path / "nope")})
    with pytest.raises(FusionlabError, match="missing.gguf"):
        load_model({"name": "x", "source": "gguf", "path": str(tmp_path / "missing.gguf")})
    with pytest.raises(FusionlabError, match="'llama3_8b'"):
        load_model({"name": "x", "source": "embedded", "path": "llama3_8b"})
    with pytest.raises(FusionlabError, match="float33"):
        load_model({**TINY, "dtype": "float33"})
    with pytest.raises(FusionlabError, match="model.source"):
        load_model({"name": "x", "source": "ftp", "path": "x"})


def test_batched_generation_equals_one_by_one():
    """Left padding and the KV cache must not change greedy outputs."""
    model, tok = load_model(TINY)
    prompts = ["Hello there, how are", "1 2 3", "A much longer prompt that needs a lot of left padding in a batch"]
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=12, batch_size=1, progress=False).texts[0] for p in prompts]
    assert batched.texts == single
    assert batched.new_tokens == [12, 12, 12] and batched.tokens_per_s > 0


def test_truncate_at_stop():
    assert truncate_at_stop("abc\nQuestion: x", ["\nQuestion:"]) == "abc"
    assert truncate_at_stop("a.b;c", [";", "."]) == "a"
    assert truncate_at_stop("abc", []) == "abc"


def test_render_prompt_plain_and_chat():
    _, tok = load_model(TINY)
    msgs = [{"role": "user", "content": "2+2?"}]
    chat = render_prompt(tok, msgs, use_chat_template=True, assistant_prefix="Let's")
    assert chat.startswith("<|im_start|>") and "2+2?" in chat and chat.endswith("assistant\nLet's")
    assert render_prompt(tok, msgs, use_chat_template=False, assistant_prefix="Let's") == "Question: 2+2?\nAnswer: Let's"
    tok.chat_template = None
    with pytest.raises(FusionlabError, match="use_chat_template=false"):
        render_prompt(tok, msgs, use_chat_template=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EMBEDDED_MODELS))
def test_embedded_models_load_from_cache(name):
    path = embedded_checkpoint(name)  # converts on first use
    stamp = path.stat().st_mtime
    model, tok = load_model({"name": name, "source": "embedded", "path": name})
    assert embedded_checkpoint(name).stat().st_mtime == stamp  # second call reuses the cache
    expected_vocab = {"smollm2_135m": 49152, "gemma3_270m": 262144}[name]
    assert model.get_output_embeddings().weight.shape[0] == expected_vocab
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_gguf_source_matches_embedded_checkpoint():
    """Loading the GGUF file directly gives the same weights as the cached conversion."""
    from fusionlab.models.embedded import _smollm2_gguf

    gguf_model, _ = load_model({"name": "g", "source": "gguf", "path": str(_smollm2_gguf())})
    cached, _ = load_model({"name": "c", "source": "embedded", "path": "smollm2_135m"})
    a = gguf_model.get_input_embeddings().weight
    b = cached.get_input_embeddings().weight
    assert torch.equal(a, b)


def test_spec_value_checks_run_when_the_spec_is_built():
    """Typed configs run these in fusionlab.schema.validate, before a job loads anything."""
    for bad, needle in [({"source": "ftp"}, "model.source 'ftp'"), ({"dtype": "float33"}, "float33"),
                        ({"device": "gpu0"}, "model.device='gpu0'"),
                        ({"source": "embedded", "path": "llama3_8b"}, "'llama3_8b'")]:
        with pytest.raises(FusionlabError, match=needle):
            ModelSpec(name="x", **bad)
    assert ModelSpec(dtype="bf16", device="cuda:1").torch_dtype() is torch.bfloat16  # a form; not checked for a GPU


def test_one_model_reference_resolver(tmp_path):
    from fusionlab.models.resolve import resolve_checkpoint

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    assert resolve_checkpoint("smollm2_135m") == embedded_checkpoint("smollm2_135m")
    assert resolve_checkpoint(str(ckpt)) == ckpt
    assert resolve_checkpoint("derived:chat", {"chat": ckpt}) == ckpt
    assert resolve_checkpoint("org/model", allow_hub=True) == "org/model"
    with pytest.raises(FusionlabError, match="'derived:cp' is not a derived checkpoint.*\\['chat'\\]"):
        resolve_checkpoint("derived:cp", {"chat": ckpt})
    with pytest.raises(FusionlabError, match="'org/model' is neither"):
        resolve_checkpoint("org/model")  # merging reads local checkpoints only
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(FusionlabError, match="is a file"):
        load_model({"name": "x", "source": "hf", "path": str(weights)})  # an hf model is a directory


def test_one_dtype_table_and_device_resolver():
    from fusionlab.models.resolve import DTYPES, resolve_device, torch_dtype

    assert torch_dtype("fp64") is torch.float64 and DTYPES["bf16"] is torch.bfloat16
    with pytest.raises(FusionlabError, match="merge.dtype 'fp8'"):
        torch_dtype("fp8", "merge.dtype")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(FusionlabError, match="merge.device='cuda:0' but no CUDA GPU"):
            resolve_device("cuda:0", "merge.device")
