"""Conversations rendered in the pivot's chat template, with assistant character spans.

Every model sees the SAME text (the pivot's rendering), so token alignment is a question of
character offsets. Assistant spans mark which characters are trained on; a token is an
assistant token when its span overlaps one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from fusionlab.errors import FusionlabError
from fusionlab.io import read_jsonl

# The conversations shipped inside the package (500 Alpaca-GPT4 records, ShareGPT format; source and
# license, CC BY-NC 4.0, in fusionlab/data/chat/README.md).
SHIPPED_CONVERSATIONS = "fusionlab/data/chat/alpaca_gpt4_500.jsonl"
_CHECKOUT = Path(__file__).resolve().parents[2]  # the dir holding the fusionlab package

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "bot": "assistant", "model": "assistant", "system": "system"}


def find_conversations(path: str | Path) -> Path:
    """The conversation file ``path`` names: as given (absolute, or relative to the cwd), else relative
    to the fusionlab checkout (so the shipped default works from any directory)."""
    p = Path(path).expanduser()
    if not p.is_file() and not p.is_absolute() and (_CHECKOUT / p).is_file():
        p = _CHECKOUT / p
    if p.is_dir():
        raise FusionlabError(f"Conversation file {str(path)!r} is a directory; set distill.data.path to the jsonl "
                             "file in it.")
    if not p.is_file():
        raise FusionlabError(f"Conversation file {str(path)!r} does not exist; set distill.data.path "
                             "to a jsonl with `conversations` or `messages` per line (default: the shipped "
                             f"{SHIPPED_CONVERSATIONS}).")
    return p


def load_conversations(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a ShareGPT-like jsonl (``conversations: [{from, value}]``) or ``messages: [{role, content}]``.

    Returns ``[{"id": str, "messages": [{"role", "content"}]}]``.
    """
    path = find_conversations(path)
    rows = read_jsonl(path, "Conversation file")
    out = []
    first_line: dict[str, int] = {}  # id -> the line that used it first
    for n, row in enumerate(rows[: limit if limit else None]):
        cid = row.get("id", n)
        if isinstance(cid, bool) or not isinstance(cid, (str, int)):
            raise FusionlabError(f"Line {n + 1} of {path}: `id` must be a string or an integer, got {cid!r:.80}; "
                                 "fix it or drop the field (the line number is used then).")
        if str(cid) in first_line:  # split.json names conversations by id: two of one name cannot be told apart
            raise FusionlabError(f"Line {n + 1} of {path} repeats id {str(cid)!r} of line {first_line[str(cid)]}; "
                                 "give every conversation its own id (or drop the ids: line numbers are used).")
        first_line[str(cid)] = n + 1
        turns = row.get("messages") or row.get("conversations")
        if not turns:
            raise FusionlabError(f"Line {n + 1} of {path} has no `conversations`/`messages` list.")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise FusionlabError(f"Line {n + 1} of {path}: `conversations`/`messages` must be a list of turns "
                                 f"({{role, content}} or {{from, value}}), got {turns!r:.80}.")
        messages = []
        for t in turns:
            role = t.get("role", t.get("from"))
            if role not in ROLE_ALIASES:
                raise FusionlabError(f"Line {n + 1} of {path}: unknown role {role!r}; use one of {sorted(ROLE_ALIASES)}.")
            content = t.get("content", t.get("value", ""))
            if not isinstance(content, str):
                raise FusionlabError(f"Line {n + 1} of {path}: a {role} turn's text must be a string, got "
                                     f"{content!r:.80}.")
            _check_encodable(content, f"Line {n + 1} of {path} (id {str(cid)!r}): the {role} turn's text")
            messages.append({"role": ROLE_ALIASES[role], "content": content})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise FusionlabError(f"Line {n + 1} of {path} (id {str(cid)!r}) has no assistant turn with text: "
                                 "there is nothing to train or evaluate on; drop it or add the reply.")
        out.append({"id": str(cid), "messages": messages})
    return out


def _check_encodable(text: str, where: str) -> None:
    """Tokenizers take only text that is valid Unicode; JSON can still spell a lone surrogate (``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FusionlabError(f"{where} holds {text[err.start]!r} at character {err.start}, a lone UTF-16 surrogate "
                             "that is not a character (a JSON \\uXXXX escape of half a pair); fix the escape or "
                             "drop that character.") from None


def split_conversations(conversations: list[dict[str, Any]], heldout: int, seed: int = 0,
                        dev_size: int = 0) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out, dev): ``heldout`` conversations drawn by a seeded permutation of the WHOLE file, so
    the held-out set is the same whatever ``limit``/``start`` select for training (every pairwise target of
    ``fusechat_merge`` is scored on the same conversations); then ``dev_size`` more drawn from the rest, the
    dev slice on which settings are chosen. Neither is ever trained on; all three keep file order.
    """
    if not 1 <= heldout < len(conversations) - dev_size or dev_size < 0:
        raise FusionlabError(f"distill.data.heldout={heldout} and dev_size={dev_size} must leave training "
                             f"conversations out of {len(conversations)}: use heldout >= 1, dev_size >= 0 and "
                             f"heldout + dev_size < {len(conversations)}.")
    order = np.random.default_rng(seed).permutation(len(conversations)).tolist()
    held, dev = set(order[:heldout]), set(order[heldout:heldout + dev_size])
    pick = lambda keep: [c for i, c in enumerate(conversations) if keep(i)]  # noqa: E731
    return pick(lambda i: i not in held and i not in dev), pick(held.__contains__), pick(dev.__contains__)


def render(tokenizer, messages: list[dict[str, str]], include_eot: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the tokenizer's chat template; return (text, assistant char spans).

    Each assistant message's content is located in the rendered text in order. With
    ``include_eot`` the span also covers the end-of-turn marker (the tokenizer's eos text)
    right after it, so the model learns to stop.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    else:  # plain-text fallback for template-less (base) pivots
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages)
    spans, cursor = [], 0
    eot = getattr(tokenizer, "eos_token", None)
    for m in messages:
        if not m["content"]:
            continue
        start = text.find(m["content"], cursor)
        if start < 0:  # templates that strip/trim content: match the stripped form
            start = text.find(m["content"].strip(), cursor)
            if start < 0:
                raise FusionlabError("The pivot's chat template changed a message's text; cannot locate "
                                     f"{m['content'][:40]!r} in the rendering. Use a template that keeps content verbatim.")
            end = start + len(m["content"].strip())
        else:
            end = start + len(m["content"])
        cursor = end
        if m["role"] != "assistant":
            continue
        if include_eot and eot:
            rest = text[end:]
            stripped = rest.lstrip(" ")
            if stripped.startswith(eot):
                end += len(rest) - len(stripped) + len(eot)
        spans.append((start, end))
    return text, spans


def dataset_fingerprint(conversations: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for c in conversations:
        h.update(json.dumps(c, sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:16]
