"""What each token id means as bytes, and which tokens two vocabularies share.

Byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen) spells a leading space as ``Ġ`` and every byte as
a printable stand-in; SentencePiece (Llama-2, Gemma) spells it ``▁`` and falls back to ``<0x0A>``
byte tokens. Comparing raw strings (the EVA reference) therefore finds almost no anchors
between the two families. Here every token is reduced to the bytes it stands for, which is
also what the ensemble decoder needs to turn a main-model token into text exactly.

The two matchings every alignment builds on live here once: :func:`surface_index` (exact match:
EVA's seed dictionary and ``exact`` method, FuseChat's EM) and :func:`nearest_by_edit_distance`
(MinED: EVA's ``mined`` method, FuseChat's ``mined`` mapping).
"""
from __future__ import annotations

import hashlib
import json
import re
from functools import lru_cache
from typing import Collection, Sequence

import numpy as np
import torch

from fusionlab.errors import FusionlabError

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
ROLES = ("bos", "eos", "pad", "unk")


@lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: printable stand-in char -> byte value."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def is_byte_level(tokenizer) -> bool:
    """True for byte-level BPE tokenizers (their decoder is ``ByteLevel``)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is not None:
        # the decoder's own JSON (microseconds), not backend.to_str() (the whole 262k vocabulary: seconds)
        return "ByteLevel" in type(backend.decoder).__name__ or '"ByteLevel"' in backend.decoder.__getstate__().decode()
    vocab = tokenizer.get_vocab()
    return "Ġ" in "".join(list(vocab)[:5000]) and "▁" not in "".join(list(vocab)[:5000])


def special_ids(tokenizer) -> set[int]:
    """Control tokens (bos/eos/pad/unk, chat markers, unused slots): never aligned by surface form."""
    ids = set(int(i) for i in tokenizer.all_special_ids if i is not None)
    for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def special_roles(tokenizer) -> dict[str, int]:
    """The ids playing each role (bos/eos/pad/unk) in this tokenizer, by role, not by id."""
    roles = {}
    for role in ROLES:
        tid = getattr(tokenizer, f"{role}_token_id", None)
        if tid is not None:
            roles[role] = int(tid)
    return roles


def vocab_tokens(tokenizer, size: int | None = None) -> list[str | None]:
    """Raw token strings by id (None for ids the tokenizer does not define)."""
    n = size if size is not None else len(tokenizer)
    out: list[str | None] = [None] * n
    for tok, i in tokenizer.get_vocab().items():
        if 0 <= i < n:
            out[i] = tok
    return out


def token_bytes(tokenizer, size: int | None = None) -> list[bytes | None]:
    """The bytes each token id stands for when decoded in the middle of a text.

    Special tokens map to their literal text (they never occur inside generated text: the
    decoder stops or skips them). ``None`` marks ids outside the tokenizer. Memoised on the
    tokenizer object (a 262k vocabulary takes seconds).
    """
    memo = tokenizer.__dict__.setdefault("_fusionlab_token_bytes", {})
    if size not in memo:
        memo[size] = _token_bytes(tokenizer, size)
    return memo[size]


def _token_bytes(tokenizer, size: int | None) -> list[bytes | None]:
    tokens = vocab_tokens(tokenizer, size)
    specials = special_ids(tokenizer)
    out: list[bytes | None] = [None] * len(tokens)
    if is_byte_level(tokenizer):
        table = _byte_level_decoder()
        for i, tok in enumerate(tokens):
            if tok is None:
                continue
            if i not in specials and all(c in table for c in tok):
                out[i] = bytes(table[c] for c in tok)
            else:
                out[i] = tok.encode("utf-8")
        return out
    for i, tok in enumerate(tokens):  # SentencePiece-style
        if tok is None:
            continue
        m = _BYTE_TOKEN.match(tok)
        if m and i not in specials:
            out[i] = bytes([int(m.group(1), 16)])
        elif i in specials:
            out[i] = tok.encode("utf-8")
        else:
            out[i] = tok.replace("▁", " ").encode("utf-8")
    return out


def tokenizer_hash(tokenizer) -> str:
    """Content hash of a tokenizer's vocabulary, specials and roles (not its file paths)."""
    cached = tokenizer.__dict__.get("_fusionlab_hash")
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False).encode())
    h.update(json.dumps(sorted(special_ids(tokenizer))).encode())
    h.update(json.dumps(special_roles(tokenizer), sort_keys=True).encode())
    h.update(str(is_byte_level(tokenizer)).encode())
    tokenizer.__dict__["_fusionlab_hash"] = h.hexdigest()[:32]
    return tokenizer.__dict__["_fusionlab_hash"]


def surface_index(surfaces: Sequence, raw: Sequence | None = None, skip: Collection[int] = (),
                  limit: int | None = None) -> dict:
    """surface -> token id: fusionlab's one exact-match index (EVA's seed dictionary, FuseChat's EM).

    Empty or undefined surfaces and the ids in ``skip`` never match; only the first ``limit`` ids
    are indexed. A surface spelled by several ids keeps the shortest ``raw`` spelling (``\\n`` over
    ``<0x0A>``), else the first id.
    """
    index: dict = {}
    n = len(surfaces) if limit is None else min(limit, len(surfaces))
    for i in range(n):
        s = surfaces[i]
        if s is None or i in skip or s in (b"", ""):
            continue
        j = index.get(s)
        if j is None or (raw is not None and len(raw[i]) < len(raw[j])):
            index[s] = i
    return index


def nearest_by_edit_distance(queries: Sequence[str], candidates: Sequence[str], max_cells: int = 2**26,
                             progress: bool = False) -> np.ndarray:
    """For each query, the index of the candidate at minimum Levenshtein distance (the first on ties).

    MinED's core (FuseLLM), shared by EVA's ``mined`` alignment and FuseChat's ``mined`` mapping:
    rapidfuzz's C ``cdist`` over blocks of queries, each block at most ``max_cells`` distances
    (256 MB of int32), so a 262k-token candidate vocabulary never needs a full distance matrix.
    """
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein
    from tqdm.auto import tqdm

    out = np.zeros(len(queries), dtype=np.int64)
    if not len(queries):
        return out
    if not len(candidates):
        raise FusionlabError("MinED needs at least one candidate token to map onto; the target vocabulary is empty.")
    block = max(1, max_cells // len(candidates))
    for start in tqdm(range(0, len(queries), block), desc="MinED", disable=not progress, leave=False):
        d = process.cdist(queries[start:start + block], candidates, scorer=Levenshtein.distance, dtype=np.int32,
                          workers=-1)
        out[start:start + block] = d.argmin(axis=1)
    return out


def token_surfaces(tokenizer) -> list[str]:
    """The surface of every id of ``tokenizer``: its bytes (:func:`token_bytes`) as a latin-1 str.

    One char = one byte, so byte-level BPE and SentencePiece tokens of the same text compare equal
    (``Ġhello`` and ``▁hello`` are both ``" hello"``) and edit distances count bytes, as FuseChat's
    token and vocabulary alignment need; special tokens keep their literal text, undefined ids are "".
    """
    return [b.decode("latin-1") if b is not None else "" for b in token_bytes(tokenizer)]


def strip_marker(surface: str) -> str:
    """Drop the word-start space (the FuseChat reference strips Ġ/▁ before comparing tokens)."""
    return surface[1:] if surface.startswith(" ") and len(surface) > 1 else surface


def seed_dictionary(aux_tokenizer, main_tokenizer, mode: str = "normalized", aux_size: int | None = None,
                    main_size: int | None = None, aux_limit: int | None = None) -> torch.Tensor:
    """Pairs ``(aux_id, main_id)`` of tokens both vocabularies share, shape ``(n, 2)``.

    ``mode="normalized"`` compares the bytes tokens stand for (``Ġthe`` == ``▁the``,
    ``Ċ`` == ``<0x0A>``); ``mode="raw"`` compares raw vocabulary strings like the reference.
    """
    if mode not in ("normalized", "raw"):
        raise FusionlabError(f"Unknown seed dictionary mode {mode!r}; use 'normalized' or 'raw'.")
    a_tok, m_tok = vocab_tokens(aux_tokenizer, aux_size), vocab_tokens(main_tokenizer, main_size)
    if mode == "raw":
        a_surf, m_surf = a_tok, m_tok
    else:
        a_surf, m_surf = token_bytes(aux_tokenizer, aux_size), token_bytes(main_tokenizer, main_size)
    a_idx = surface_index(a_surf, a_tok, special_ids(aux_tokenizer), aux_limit)
    m_idx = surface_index(m_surf, m_tok, special_ids(main_tokenizer))
    pairs = sorted((a, m_idx[s]) for s, a in a_idx.items() if s in m_idx)
    if not pairs:
        raise FusionlabError(
            "The two vocabularies share no tokens (seed dictionary is empty"
            f"{' in raw mode' if mode == 'raw' else ''}), so they cannot be aligned. "
            + ("Use align_method.seed_mode=normalized. " if mode == "raw" else "")
            + "Check that the aux and main models are text LLMs with tokenizers for overlapping scripts."
        )
    return torch.tensor(pairs, dtype=torch.long)


def split_seed(seed: torch.Tensor, holdout: float, rng_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the seed dictionary into (train, held-out) pairs; the held-out part measures P@1."""
    n = seed.shape[0]
    n_test = int(round(n * holdout)) if holdout > 0 else 0
    if n - n_test < 2:
        raise FusionlabError(f"Only {n} shared tokens: too few to fit an alignment with holdout={holdout}.")
    g = torch.Generator().manual_seed(rng_seed)
    perm = torch.randperm(n, generator=g)
    return seed[perm[n_test:]], seed[perm[:n_test]]
