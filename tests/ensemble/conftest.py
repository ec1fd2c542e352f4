import pytest

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="session")
def tiny_pair():
    """(tiny random llama + SmolLM2 tokenizer, tiny random gemma3 + Gemma-3 tokenizer)."""
    from fusionlab.models import load_model

    main = load_model({"name": "m", "source": "random", "tokenizer": "smollm2_135m",
                       "config": {"model_type": "llama", **TINY}})
    aux = load_model({"name": "g", "source": "random", "tokenizer": "gemma3_270m", "seed": 1,
                      "config": {"model_type": "gemma3_text", **TINY, "head_dim": 8, "num_key_value_heads": 1}})
    return main, aux
