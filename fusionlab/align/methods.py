"""Vocabulary alignment methods: one function per method, a plain dict as the registry.

Each method maps ``(aux_model, aux_tokenizer, main_model, main_tokenizer, **params)`` to an
:class:`Alignment` (aux vocab -> main vocab). :func:`align` adds what every method shares:
special tokens mapped by role, the held-out P@1 figure, timing and the on-disk cache.
"""
from __future__ import annotations

import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fusionlab.align.alignment import Alignment, cache_key, cached, embeddings_hash, output_embeddings
from fusionlab.align.vecmap import csls_topk, supervised_map
from fusionlab.align.vocab import (ROLES, seed_dictionary, special_ids, special_roles, split_seed, token_bytes,
                                   tokenizer_hash)
from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)


def _vocab_sizes(aux_model, main_model) -> tuple[int, int]:
    return output_embeddings(aux_model).shape[0], output_embeddings(main_model).shape[0]


def _rows_limit(n: int, cutoff: int | None) -> int:
    return n if not cutoff else min(int(cutoff), n)


def vecmap_csls(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str = "normalized", holdout: float = 0.1,
                seed: int = 0, k: int = 10, neighborhood: int = 1, threshold: float = 0.1,
                std_filter: tuple[int, float] | None = (5, 0.01), whiten: bool = True, reweight: float = 0.5,
                dim: int | None = None, aux_vocab_cutoff: int | None = None, block: int = 1024,
                device: str | None = None, progress: bool = False, **_: Any) -> Alignment:
    """EVA: supervised VecMap on the output embeddings, then CSLS top-k per aux token (ALGORITHMS.md §1).

    The CSLS passes (two aux_vocab × main_vocab × dim products, the whole cost) run on ``device``
    (default: the main model's device, so a GPU builds the full 262k × 49k pair in seconds).
    """
    x, z = output_embeddings(aux_model).float().cpu(), output_embeddings(main_model).float().cpu()
    device = torch.device(device) if device else output_embeddings(main_model).device
    n_aux, n_main = x.shape[0], z.shape[0]
    limit = _rows_limit(n_aux, aux_vocab_cutoff)
    pairs = seed_dictionary(aux_tok, main_tok, seed_mode, n_aux, n_main, aux_limit=limit)
    train, test = split_seed(pairs, holdout, seed)
    if train.shape[0] < min(x.shape[1], z.shape[1]):
        log.warning("Only %d seed pairs for %d/%d-dim embeddings: the whitening is rank-deficient",
                    train.shape[0], x.shape[1], z.shape[1])
    x = x[:limit]  # a vocabulary cutoff (VecMap's --vocabulary_cutoff): ids are ordered by frequency
    t0 = time.perf_counter()
    xm, zm = supervised_map(x, z, train[:, 0], train[:, 1], whiten=whiten, reweight=reweight, dim=dim)
    t_map = time.perf_counter() - t0
    aux_special = special_ids(aux_tok)
    rows = torch.tensor([i for i in range(limit) if i not in aux_special], dtype=torch.long)
    excluded = torch.tensor(sorted(i for i in special_ids(main_tok) if i < n_main), dtype=torch.long)
    cols, vals, top1 = csls_topk(xm.to(device), zm.to(device), k=k, neighborhood=neighborhood, threshold=threshold,
                                 std_filter=tuple(std_filter) if std_filter else None, excluded_cols=excluded,
                                 rows=rows, block=block, progress=progress)
    if limit < n_aux:  # tokens past the cutoff project nowhere
        cols = torch.cat([cols, torch.full((n_aux - limit, cols.shape[1]), -1, dtype=torch.long)])
        vals = torch.cat([vals, torch.zeros(n_aux - limit, vals.shape[1])])
    stats = {"seed_pairs": int(pairs.shape[0]), "train_pairs": int(train.shape[0]), "test_pairs": int(test.shape[0]),
             "map_s": round(t_map, 3), "csls_s": round(time.perf_counter() - t0 - t_map, 3),
             "rows_computed": int(len(rows))}
    if test.shape[0]:
        stats["p_at_1"] = float((top1[test[:, 0]] == test[:, 1]).float().mean())
    return Alignment(cols, vals, n_main, "vecmap_csls", stats)


def exact(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str = "normalized",
          aux_vocab_cutoff: int | None = None, **_: Any) -> Alignment:
    """Each aux token maps to the main token with the same surface form (weight 1), else nowhere."""
    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    pairs = seed_dictionary(aux_tok, main_tok, seed_mode, n_aux, n_main, aux_limit=_rows_limit(n_aux, aux_vocab_cutoff))
    cols = torch.full((n_aux, 1), -1, dtype=torch.long)
    cols[pairs[:, 0], 0] = pairs[:, 1]
    return Alignment(cols, (cols >= 0).float(), n_main, "exact", {"seed_pairs": int(pairs.shape[0])})


def mined(aux_model, aux_tok, main_model, main_tok, *, seed_mode: str = "normalized",
          aux_vocab_cutoff: int | None = None, block: int = 2048, progress: bool = False, **_: Any) -> Alignment:
    """MinED (FuseLLM): exact matches first, every other aux token to the main token at minimum edit distance."""
    import numpy as np
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein
    from tqdm.auto import tqdm

    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    limit = _rows_limit(n_aux, aux_vocab_cutoff)
    pairs = seed_dictionary(aux_tok, main_tok, seed_mode, n_aux, n_main, aux_limit=limit)
    cols = torch.full((n_aux, 1), -1, dtype=torch.long)
    cols[pairs[:, 0], 0] = pairs[:, 1]
    a_text = [b.decode("utf-8", "replace") if b is not None else None for b in token_bytes(aux_tok, n_aux)]
    m_bytes = token_bytes(main_tok, n_main)
    m_special = special_ids(main_tok)
    m_ids = [j for j in range(n_main) if m_bytes[j] and j not in m_special]
    m_text = [m_bytes[j].decode("utf-8", "replace") for j in m_ids]
    a_special = special_ids(aux_tok)
    todo = [i for i in range(limit) if cols[i, 0] < 0 and a_text[i] and i not in a_special]
    for start in tqdm(range(0, len(todo), block), desc="MinED", disable=not progress, leave=False):
        ids = todo[start:start + block]
        d = process.cdist([a_text[i] for i in ids], m_text, scorer=Levenshtein.distance, dtype=np.int32, workers=-1)
        cols[torch.tensor(ids), 0] = torch.tensor(m_ids)[torch.from_numpy(d.argmin(axis=1))]
    return Alignment(cols, (cols >= 0).float(), n_main, "mined",
                     {"seed_pairs": int(pairs.shape[0]), "mined_rows": len(todo)})


ALIGN_METHODS: dict[str, Callable[..., Alignment]] = {"vecmap_csls": vecmap_csls, "exact": exact, "mined": mined}


def _map_specials(alignment: Alignment, aux_tok, main_tok, aux_eos_ids=()) -> int:
    """Point each aux control token at the main token playing the same role (bos->bos, eos->eos...)."""
    a_roles, m_roles = special_roles(aux_tok), special_roles(main_tok)
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for role in ("eos", *[r for r in ROLES if r != "eos"]):
        a, m = a_roles.get(role), m_roles.get(role)
        if a is None or m is None or a in pairs or (m in used and role != "eos"):
            continue  # e.g. main pad == main eos: do not send aux pad mass to eos
        pairs[a] = m
        used.add(m)
    for a in aux_eos_ids:  # chat "end of turn" tokens end the answer too
        if "eos" in m_roles:
            pairs.setdefault(int(a), m_roles["eos"])
    for a, m in pairs.items():
        if a < alignment.aux_vocab and m < alignment.main_vocab:
            alignment.cols[a] = -1
            alignment.vals[a] = 0
            alignment.cols[a, 0] = m
            alignment.vals[a, 0] = 1.0
    return len(pairs)


def align(aux_model, aux_tok, main_model, main_tok, method: str = "vecmap_csls", *, normalize_rows: bool = False,
          cache_dir: str | Path | None = None, rebuild: bool = False, aux_eos_ids=(),
          **params: Any) -> Alignment:
    """Build (or load from ``cache_dir``) the projection of ``aux`` onto ``main``'s vocabulary.

    The cache key hashes both tokenizers, both output embedding matrices and every setting,
    so a changed model or option never reuses an old file.
    """
    if method not in ALIGN_METHODS:
        raise FusionlabError(f"Unknown align method {method!r}; use one of {sorted(ALIGN_METHODS)}.")
    fn = inspect.signature(ALIGN_METHODS[method]).parameters
    known = {n for n, p in fn.items() if p.kind is inspect.Parameter.KEYWORD_ONLY} | {"holdout", "seed", "seed_mode"}
    unknown = sorted(set(params) - known)
    if unknown:  # the methods accept **_ (shared options), so a typo would otherwise be ignored silently
        raise FusionlabError(f"Unknown align_method option(s) {unknown} for method {method!r}; "
                             f"valid options are {sorted(known | {'normalize_rows', 'cache_dir', 'rebuild'})}.")
    n_aux, n_main = _vocab_sizes(aux_model, main_model)
    key_params = {**{k: v for k, v in params.items() if k not in ("progress", "block", "device")},
                  "normalize_rows": normalize_rows, "aux_eos_ids": sorted(int(i) for i in aux_eos_ids)}
    key = cache_key(method, key_params, tokenizer_hash(aux_tok), tokenizer_hash(main_tok),
                    embeddings_hash(aux_model), embeddings_hash(main_model))

    def build() -> Alignment:
        start = time.perf_counter()
        result = ALIGN_METHODS[method](aux_model, aux_tok, main_model, main_tok, **params)
        n_special = _map_specials(result, aux_tok, main_tok, aux_eos_ids)
        if normalize_rows:
            result = result.normalized()
        mapped = (result.cols >= 0).any(dim=1)
        result.stats.update({"build_s": round(time.perf_counter() - start, 3), "special_pairs": n_special,
                             "rows_mapped": int(mapped.sum()), "rows_total": n_aux,
                             "nnz": int((result.cols >= 0).sum())})
        if "p_at_1" not in result.stats:  # methods without a fitted map: P@1 of the map on the same held-out pairs
            pairs = seed_dictionary(aux_tok, main_tok, params.get("seed_mode", "normalized"), n_aux, n_main)
            _, test = split_seed(pairs, params.get("holdout", 0.1), params.get("seed", 0))
            best = result.cols.gather(1, result.vals.argmax(dim=1, keepdim=True))[:, 0]
            result.stats["p_at_1"] = float((best[test[:, 0]] == test[:, 1]).float().mean()) if len(test) else float("nan")
        log.info("Built %s alignment (%d aux -> %d main tokens) in %.1f s: %s", method, n_aux, n_main,
                 result.stats["build_s"], result.stats)
        return result

    return cached(build, Path(cache_dir) if cache_dir is not None else None, key, n_aux, n_main, rebuild)
