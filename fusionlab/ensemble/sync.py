"""Exact text synchronisation: feed the main model's text to an aux model in the aux's own tokens.

The main model's tokens are turned into bytes (not into ``decode`` strings, which lose leading
spaces of SentencePiece pieces and cannot represent half a UTF-8 character). An aux model sees
only the complete UTF-8 prefix of those bytes; each step only the last ``window`` aux tokens
are re-tokenised, and the ones whose segmentation changed are rolled back.
"""
from __future__ import annotations

from fusionlab.align.vocab import token_bytes


def complete_utf8(data: bytes) -> bytes:
    """The longest prefix of ``data`` that does not end inside a UTF-8 character."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        b = data[n - back]
        if b < 0x80:  # ASCII: complete
            return data
        if b >= 0xC0:  # lead byte: is its character complete?
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return data if back >= need else data[:n - back]
    return data


def encode_text(tokenizer, text: str, table: list[bytes | None]) -> tuple[list[int], bool]:
    """Token ids for ``text`` in the middle of a document, and whether they spell it exactly.

    Handles tokenizers that prepend a space to every encoded string (SentencePiece's dummy
    prefix) by encoding without the text's own leading space.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    want = text.encode("utf-8")
    got = b"".join(table[i] or b"" for i in ids)
    if got == want:
        return ids, True
    if got == b" " + want and ids:  # dummy prefix
        if ids and table[ids[0]] == b" ":
            return ids[1:], True
        if text.startswith(" "):
            alt = tokenizer(text[1:], add_special_tokens=False)["input_ids"]
            if b"".join(table[i] or b"" for i in alt) == want:
                return alt, True
    return ids, False


class TextSync:
    """The aux tokens that spell one row's generated text, updated incrementally."""

    def __init__(self, tokenizer, window: int = 4):
        self.tokenizer = tokenizer
        self.table = token_bytes(tokenizer)
        self.window = window
        self.tokens: list[int] = []
        self.ends: list[int] = []  # byte offset where each token ends
        self.mismatches = 0

    def update(self, text: bytes) -> tuple[int, list[int]]:
        """Sync to generated ``text`` (bytes); return (tokens to roll back, tokens to feed)."""
        # Invalid bytes (a model can emit any byte sequence) become U+FFFD; the complete prefix's
        # decoding never changes when more bytes arrive, so offsets stay valid.
        text = complete_utf8(text).decode("utf-8", "replace").encode("utf-8")
        a = max(0, len(self.tokens) - self.window)
        while a > 0 and (self.ends[a - 1] >= len(text) or 0x80 <= text[self.ends[a - 1]] < 0xC0):
            a -= 1  # never start re-tokenising inside a character (byte-fallback tokens)
        start = self.ends[a - 1] if a else 0
        if start == len(text) and a == len(self.tokens):
            return 0, []
        ids, ok = encode_text(self.tokenizer, text[start:].decode("utf-8"), self.table)
        self.mismatches += not ok
        old = self.tokens[a:]
        c = 0
        while c < min(len(old), len(ids)) and old[c] == ids[c]:
            c += 1
        rollback, new = len(old) - c, ids[c:]
        self.tokens = self.tokens[:a + c] + new
        self.ends = self.ends[:a + c]
        pos = self.ends[-1] if self.ends else 0
        for t in new:
            pos += len(self.table[t] or b"")
            self.ends.append(pos)
        return rollback, new
