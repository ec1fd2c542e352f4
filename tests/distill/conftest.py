from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smol_tok():
    from fusionlab.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(name="smollm2_135m", source="embedded", path="smollm2_135m"))


@pytest.fixture(scope="session")
def gemma_tok():
    from fusionlab.models import ModelSpec, load_tokenizer

    return load_tokenizer(ModelSpec(name="gemma3_270m", source="embedded", path="gemma3_270m"))
