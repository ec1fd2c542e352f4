"""Plain text sets — what representation metrics, perplexity and short fine-tunes read — from one loader.

A named set is a :class:`TextSetDef` record in :data:`TEXT_SETS`: where its rows come from (a JSONL
file shipped under ``fusionlab/data``, a task's examples, or conversations) and a ``str.format``
template that makes one text of each row. Anything else is a JSONL file with the text under
``field``, or the texts themselves.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fusionlab.errors import FusionlabError
from fusionlab.io import read_jsonl
from fusionlab.tasks.formats import fill

DATA_ROOT = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class TextSetDef:
    """One named text set: its rows and the template that turns a row into a text."""

    template: str
    data_file: str | None = None  # JSONL under fusionlab/data, rows as they are
    task: str | None = None  # or the examples of this task (fusionlab.tasks.load_examples)
    conversations: bool = False  # rows are chats ({conversations} or {messages}): their first exchange


TEXT_SETS: dict[str, TextSetDef] = {
    "erank": TextSetDef("{text}", data_file="erank_texts.jsonl"),  # the default set
    "chat": TextSetDef("Question: {question}\nAnswer: {answer}", data_file="chat/fusechat_mini.jsonl",
                       conversations=True),
    "addsub": TextSetDef("Question: {question}\nAnswer: {equation} so the answer is {answer}.", task="addsub"),
    "e2e": TextSetDef("Data: {question}\nText: {answer[0]}", task="e2e"),
    "gsm8k": TextSetDef("Question: {question}\nAnswer: {solution}", task="gsm8k"),  # the worked solution
}
DEFAULT_TEXT_SET = "erank"


def _first_exchange(row: dict[str, Any]) -> dict[str, Any]:
    turns = row.get("conversations") or [{"value": m["content"]} for m in row.get("messages", [])]
    return {"question": turns[0]["value"], "answer": turns[1]["value"]}


def _named_texts(name: str, path: Path | None) -> list[str]:
    from fusionlab.tasks import load_examples

    spec = TEXT_SETS[name]
    if spec.task is not None:
        rows = load_examples(spec.task, path=str(path) if path else None)
    else:
        rows = read_jsonl(path or DATA_ROOT / spec.data_file)
        if spec.conversations:
            rows = [_first_exchange(r) for r in rows]
    return [fill(spec.template, row, f"Text set {name!r}") for row in rows]


def _file_texts(path: Path, field: str) -> list[str]:
    texts = []
    for number, row in enumerate(read_jsonl(path, "Text file"), 1):
        if field not in row:
            raise FusionlabError(f"Row {number} of {str(path)!r} has no field {field!r} (it has {sorted(row)}); "
                                 "name the field that holds the text (text_field).")
        texts.append(str(row[field]))
    return texts


def load_text_set(source: str | os.PathLike | Sequence[str] | None = None, *, path: str | os.PathLike | None = None,
                  field: str = "text", start: int = 0, stop: int | None = None) -> list[str]:
    """Texts ``[start, stop)`` of ``source``: a name in :data:`TEXT_SETS` (``path``: a user JSONL of that
    set's format instead of its own rows), a JSONL file with the text under ``field``, a list of texts,
    or None for the default set."""
    if source is not None and not isinstance(source, (str, os.PathLike)):
        texts = [str(t) for t in source]
        label = "the given list of texts" if texts else "an empty list of texts"
    else:
        source = DEFAULT_TEXT_SET if source is None else source
        file = Path(path).expanduser() if path is not None else None
        if isinstance(source, str) and source in TEXT_SETS:
            if file is not None and not file.is_file():
                raise FusionlabError(f"Text file {str(file)!r} for the {source!r} text set does not exist; drop it "
                                     "to use the shipped rows.")
            texts, label = _named_texts(source, file), f"the text set {source!r}"
        else:
            file = Path(source).expanduser()
            if not file.is_file():
                raise FusionlabError(f"Text set {str(source)!r} does not exist: it is neither a named set "
                                     f"({sorted(TEXT_SETS)}) nor a JSONL file.")
            texts, label = _file_texts(file, field), f"the text set {str(file)!r}"
    out = texts[start:stop]
    if not out:
        raise FusionlabError(f"Rows [{start}, {stop}) of {label} ({len(texts)} texts) are empty; give at least one "
                             "text, or pick start/stop inside the set.")
    return out
