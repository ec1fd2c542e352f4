"""The projection from an aux vocabulary into the main vocabulary, and its on-disk cache.

A projection is sparse with a small fixed number of entries per aux token (CSLS keeps ten),
so it is stored row-padded ("ELL" layout): ``cols`` (aux_vocab × width, -1 = empty) and
``vals``. Projecting a top-k-truncated distribution is then a gather of k rows and one
scatter-add: microseconds per step, never a dense aux × main matrix.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_path

log = logging.getLogger(__name__)

# Bump when a build's output changes for the same inputs, so old cache files are never reused.
CACHE_VERSION = "2"  # 2: P@1 over the whole seed dictionary, main padding rows never targets


@dataclass
class Alignment:
    """aux-vocab -> main-vocab projection S (rows: aux ids, columns: main ids)."""

    cols: torch.Tensor  # (aux_vocab, width) long, -1 = no entry
    vals: torch.Tensor  # (aux_vocab, width) float32
    main_vocab: int
    method: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    @property
    def aux_vocab(self) -> int:
        return self.cols.shape[0]

    @classmethod
    def identity(cls, vocab: int) -> "Alignment":
        return cls(torch.arange(vocab)[:, None], torch.ones(vocab, 1), vocab, method="identity",
                   stats={"rows_mapped": vocab, "nnz": vocab})

    def to(self, device) -> "Alignment":
        return Alignment(self.cols.to(device), self.vals.to(device), self.main_vocab, self.method, self.stats, self.key)

    def normalized(self) -> "Alignment":
        """Rows rescaled to sum to one, so projected distributions keep their mass."""
        s = self.vals.sum(dim=1, keepdim=True)
        vals = torch.where(s > 0, self.vals / s.clamp_min(1e-12), self.vals)
        return Alignment(self.cols, vals, self.main_vocab, self.method, self.stats, self.key)

    def to_sparse(self) -> torch.Tensor:
        """The full (aux_vocab × main_vocab) matrix as a torch sparse COO tensor."""
        mask = self.cols >= 0
        rows = torch.arange(self.aux_vocab, device=self.cols.device)[:, None].expand_as(self.cols)[mask]
        return torch.sparse_coo_tensor(torch.stack([rows, self.cols[mask]]), self.vals[mask],
                                       (self.aux_vocab, self.main_vocab), check_invariants=False).coalesce()

    def project(self, probs: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """q = S^T p for a batch: ``probs`` (B, k) over aux ids ``ids`` (B, k), or dense (B, aux_vocab)."""
        if ids is None:
            ids = probs.nonzero()  # dense input: use its non-zeros
            out = torch.zeros(probs.shape[0], self.main_vocab, dtype=probs.dtype, device=probs.device)
            c, v = self.cols[ids[:, 1]], self.vals[ids[:, 1]].to(probs.dtype) * probs[ids[:, 0], ids[:, 1]][:, None]
            out.index_put_((ids[:, 0, None].expand_as(c)[c >= 0], c[c >= 0]), v[c >= 0], accumulate=True)
            return out
        ids = ids.clamp_max(self.aux_vocab - 1)  # ids past the aux tokenizer's rows (padding) map nowhere
        c = self.cols[ids]  # (B, k, w)
        v = self.vals[ids].to(probs.dtype) * probs[..., None]
        v = torch.where(c >= 0, v, torch.zeros_like(v))
        out = torch.zeros(probs.shape[0], self.main_vocab, dtype=probs.dtype, device=probs.device)
        return out.scatter_add_(1, c.clamp_min(0).flatten(1), v.flatten(1))


# ---------------------------------------------------------------------------------------- hashing
def tensor_hash(t: torch.Tensor) -> str:
    """Content hash of a tensor (dtype, shape and bytes)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().reshape(-1).data if t.numel() else b"")
    return h.hexdigest()[:32]


def output_embeddings(model) -> torch.Tensor:
    """The output embedding matrix (lm_head / tied embeddings), one row per token."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2:
        raise FusionlabError(
            f"Model {type(model).__name__} has no output embedding matrix (get_output_embeddings() returned "
            f"{type(head).__name__}); EVA aligns vocabularies through lm_head rows, so use a causal LM "
            "(AutoModelForCausalLM) with a token-level output layer."
        )
    return weight.detach()


def embeddings_hash(model) -> str:
    memo = model.__dict__.setdefault("_fusionlab_emb_hash", {})
    w = output_embeddings(model)
    key = (w.data_ptr(), tuple(w.shape), w._version)
    if key not in memo:
        memo[key] = tensor_hash(w)
    return memo[key]


# ---------------------------------------------------------------------------------------- cache
def cache_key(method: str, params: dict[str, Any], aux_tok_hash: str, main_tok_hash: str, aux_emb_hash: str,
              main_emb_hash: str) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "method": method, "params": params, "aux_tok": aux_tok_hash,
                       "main_tok": main_tok_hash, "aux_emb": aux_emb_hash, "main_emb": main_emb_hash},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def save_alignment(path: Path, alignment: Alignment) -> None:
    """Write atomically: a checksum of the payload lets a later load detect a damaged file."""
    from safetensors.torch import save_file

    cols, vals = alignment.cols.to(torch.int32).contiguous(), alignment.vals.float().contiguous()
    meta = {"key": alignment.key, "method": alignment.method, "main_vocab": str(alignment.main_vocab),
            "stats": json.dumps(alignment.stats), "checksum": tensor_hash(cols) + tensor_hash(vals),
            "version": CACHE_VERSION}
    with atomic_path(path) as tmp:
        save_file({"cols": cols, "vals": vals}, str(tmp), metadata=meta)


def load_alignment(path: Path, expected_key: str, aux_vocab: int, main_vocab: int) -> Alignment | None:
    """The cached alignment at ``path``; None if it belongs to other inputs (stale: never used).

    A file that exists but cannot be read back intact raises: silently rebuilding would hide
    a disk problem, and silently using it would corrupt every ensemble run.
    """
    from safetensors import safe_open

    fix = f"Delete {str(path)!r} (or run with ensemble.rebuild_alignment=true) to rebuild it."
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            cols, vals = f.get_tensor("cols").long(), f.get_tensor("vals")
    except Exception as e:  # safetensors raises several types for truncated / garbage files
        raise FusionlabError(f"The vocabulary alignment cache file {str(path)!r} is corrupt ({type(e).__name__}: {e}). {fix}") from e
    if meta.get("key") != expected_key or meta.get("version") != CACHE_VERSION:
        log.warning("Ignoring stale alignment cache %s (built for other models/tokenizers/settings)", path)
        return None
    if (cols.shape != vals.shape or cols.shape[0] != aux_vocab or int(meta.get("main_vocab", -1)) != main_vocab
            or meta.get("checksum") != tensor_hash(cols.to(torch.int32)) + tensor_hash(vals)):
        raise FusionlabError(f"The vocabulary alignment cache file {str(path)!r} is corrupt (shape or checksum "
                             f"mismatch). {fix}")
    return Alignment(cols, vals.float(), main_vocab, meta.get("method", ""), json.loads(meta.get("stats", "{}")),
                     expected_key)


def cached(build, path_dir: Path | None, key: str, aux_vocab: int, main_vocab: int, rebuild: bool = False) -> Alignment:
    """Load ``<path_dir>/<key>.safetensors`` or ``build()`` and store it there."""
    path = None if path_dir is None else Path(path_dir) / f"{key}.safetensors"
    if path is not None and path.exists() and not rebuild:
        start = time.perf_counter()
        hit = load_alignment(path, key, aux_vocab, main_vocab)
        if hit is not None:
            hit.stats = {**hit.stats, "cache_hit": 1, "load_s": round(time.perf_counter() - start, 3)}
            log.info("Loaded vocabulary alignment from cache %s", path)
            return hit
    alignment = build()
    alignment.key = key
    alignment.stats["cache_hit"] = 0
    if path is not None:
        save_alignment(path, alignment)
        log.info("Cached vocabulary alignment at %s", path)
    return alignment
