"""Chat vector extract/add: the arithmetic, skip_embed, special rows from the CHAT model, tied embeddings."""
from __future__ import annotations

import json

import pytest
import torch

from fusionlab.errors import FusionlabError
from fusionlab.merge import chat_vector as cv

from .conftest import TINY, load_dir, tiny_state, write_model


@pytest.fixture
def trio(tmp_path):
    base, chat, cp = tiny_state(0), tiny_state(1), tiny_state(2)
    return {k: write_model(tmp_path / k, sd) for k, sd in (("base", base), ("chat", chat), ("cp", cp))}


def test_extract_and_add(tmp_path, trio):
    info = cv.extract(str(trio["base"]), str(trio["chat"]), tmp_path / "cv", progress=False)
    assert info["cv_tensors"] == len(tiny_state(0))
    meta = json.loads((tmp_path / "cv" / "chat_vector.json").read_text())
    assert meta["chat"] == str(trio["chat"])
    cv.add(str(trio["cp"]), [str(tmp_path / "cv")], [0.5], tmp_path / "out", progress=False)
    b, c, p, o = (load_dir(trio["base"]), load_dir(trio["chat"]), load_dir(trio["cp"]), load_dir(tmp_path / "out"))
    for name in b:
        torch.testing.assert_close(o[name], p[name] + 0.5 * (c[name] - b[name]))
    # two vectors: cp + Σ rᵢ τᵢ; the same vector twice at 0.25 equals once at 0.5
    cv.add(str(trio["cp"]), [str(tmp_path / "cv")] * 2, [0.25, 0.25], tmp_path / "out2", progress=False)
    o2 = load_dir(tmp_path / "out2")
    for name in b:
        torch.testing.assert_close(o2[name], o[name])


def test_skip_embed_and_special_tokens_from_chat(tmp_path, trio):
    cv.extract(str(trio["base"]), str(trio["chat"]), tmp_path / "cv", skip_embed=True, progress=False)
    cv.add(str(trio["cp"]), [str(tmp_path / "cv")], 1.0, tmp_path / "out", skip_embed=True,
           special_tokens_map={5: 7, 9: 2}, progress=False)
    c, p, o = load_dir(trio["chat"]), load_dir(trio["cp"]), load_dir(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        keep = [i for i in range(TINY["vocab_size"]) if i not in (5, 9)]
        assert torch.equal(o[name][keep], p[name][keep])  # embeddings left alone...
        assert torch.equal(o[name][5], c[name][7]) and torch.equal(o[name][9], c[name][2])  # ...but the CHAT rows
    # without skip_embed at add time, the missing embedding delta is an error that says why
    with pytest.raises(FusionlabError, match="skip_embed"):
        cv.add(str(trio["cp"]), [str(tmp_path / "cv")], 1.0, tmp_path / "out3", progress=False)
    assert not (tmp_path / "out3").exists()


def test_vocab_mismatch_is_an_error_unless_skip_embed(tmp_path, trio):
    big = {**TINY, "vocab_size": 100}
    cp_big = write_model(tmp_path / "cp_big", tiny_state(3, big), big)
    cv.extract(str(trio["base"]), str(trio["chat"]), tmp_path / "cv", progress=False)
    with pytest.raises(FusionlabError, match=r"Vocabulary size mismatch in '(model.embed_tokens|lm_head).weight'"):
        cv.add(str(cp_big), [str(tmp_path / "cv")], 1.0, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    cv.add(str(cp_big), [str(tmp_path / "cv")], 1.0, tmp_path / "out", skip_embed=True, progress=False)
    o, p = load_dir(tmp_path / "out"), load_dir(cp_big)
    assert torch.equal(o["model.embed_tokens.weight"], p["model.embed_tokens.weight"])
    with pytest.raises(FusionlabError, match="Vocabulary size mismatch"):
        cv.extract(str(trio["base"]), str(cp_big), tmp_path / "cv2", progress=False)


def test_tied_embeddings(tmp_path):
    tied = {**TINY, "tie_word_embeddings": True}
    base, chat = write_model(tmp_path / "b", tiny_state(0, tied), tied), write_model(tmp_path / "c", tiny_state(1, tied), tied)
    cp_untied = write_model(tmp_path / "cp", tiny_state(2))
    cv.extract(str(base), str(chat), tmp_path / "cv", progress=False)
    assert "lm_head.weight" not in load_dir(tmp_path / "cv")  # one tensor for tied embeddings
    cv.add(str(cp_untied), [str(tmp_path / "cv")], 1.0, tmp_path / "out", progress=False)
    b, c, p, o = load_dir(base), load_dir(chat), load_dir(cp_untied), load_dir(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(o["lm_head.weight"], p["lm_head.weight"] + c[emb] - b[emb])
    torch.testing.assert_close(o[emb], p[emb] + c[emb] - b[emb])


def test_chat_vector_equals_task_arithmetic(tmp_path, trio):
    """ALGORITHMS.md §3: chat vector = task arithmetic with base = pre-trained, cp at weight 1, chat at ratio."""
    from fusionlab.merge import MergeConfig, merge

    cv.extract(str(trio["base"]), str(trio["chat"]), tmp_path / "cv", progress=False)
    cv.add(str(trio["cp"]), [str(tmp_path / "cv")], 0.7, tmp_path / "a", progress=False)
    merge(MergeConfig.from_dict({"method": "task_arithmetic", "base": str(trio["base"]), "output": str(tmp_path / "b"),
                                 "progress": False, "models": [
                                     {"model": str(trio["cp"]), "parameters": {"weight": 1.0}},
                                     {"model": str(trio["chat"]), "parameters": {"weight": 0.7}}]}))
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)
