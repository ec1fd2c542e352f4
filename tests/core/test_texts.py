"""The one text-set loader: named sets, JSONL files, lists, rows [start, stop), and its errors."""
from __future__ import annotations

import json

import pytest

from fusionlab.errors import FusionlabError
from fusionlab.tasks import load_examples
from fusionlab.tasks.texts import DATA_ROOT, TEXT_SETS, load_text_set


def test_named_sets_are_rows_through_their_template():
    addsub = load_examples("addsub", limit=3)
    assert load_text_set("addsub", stop=3) == [
        f"Question: {r['question']}\nAnswer: {r['equation']} so the answer is {r['answer']}." for r in addsub]
    first = json.loads((DATA_ROOT / TEXT_SETS["chat"].data_file).read_text(encoding="utf-8").splitlines()[0])
    turns = first.get("conversations") or [{"value": m["content"]} for m in first["messages"]]
    assert load_text_set("chat", stop=1) == [f"Question: {turns[0]['value']}\nAnswer: {turns[1]['value']}"]
    e2e = load_examples("e2e", limit=1)[0]
    assert load_text_set("e2e", stop=1) == [f"Data: {e2e['question']}\nText: {e2e['answer'][0]}"]
    assert load_text_set() == load_text_set("erank") and len(load_text_set()) == 40
    assert load_text_set("gsm8k", start=2, stop=5) == load_text_set("gsm8k")[2:5]


def test_files_lists_and_user_data_for_a_named_set(tmp_path):
    texts = tmp_path / "t.jsonl"
    texts.write_text(json.dumps({"content": "one"}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    assert load_text_set(texts, field="content") == ["one", "two"]
    assert load_text_set(str(texts), field="content", start=1) == ["two"]
    assert load_text_set(["a", "b", "c"], stop=2) == ["a", "b"]
    mine = tmp_path / "addsub.jsonl"
    mine.write_text(json.dumps({"question": "1 + 2?", "answer": 3, "equation": "X = 1 + 2"}) + "\n")
    assert load_text_set("addsub", path=mine) == ["Question: 1 + 2?\nAnswer: X = 1 + 2 so the answer is 3."]


def test_errors_name_the_set_and_the_fix(tmp_path):
    with pytest.raises(FusionlabError, match="neither a named set"):
        load_text_set("no_such_set")
    with pytest.raises(FusionlabError, match="does not exist"):
        load_text_set("chat", path=tmp_path / "missing.jsonl")
    with pytest.raises(FusionlabError, match=r"Rows \[500, None\) of the text set 'addsub' \(395 texts\) are empty"):
        load_text_set("addsub", start=500)
    with pytest.raises(FusionlabError, match="empty list of texts"):
        load_text_set([])
    no_equation = tmp_path / "plain.jsonl"
    no_equation.write_text(json.dumps({"question": "q", "answer": 1}) + "\n")
    with pytest.raises(FusionlabError, match="'equation'"):
        load_text_set("addsub", path=no_equation)
