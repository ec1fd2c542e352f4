"""Per-token top-k logits and per-sample CE of a model over the pivot-rendered texts.

Stored in safetensors shards of ``shard_size`` samples, flat (no padding): ``lengths`` [N] and
the concatenated ``input_ids``, ``offsets`` (character spans), ``assistant`` (mask), ``topk_ids``,
``topk_logits`` [ΣL, k] and ``ce`` [N]. A JSON sidecar per shard holds the sample ids and how
many samples were dropped (NaN logits/CE, or no assistant token). Shards are written
atomically, so an interrupted extraction resumes at the first missing shard; ``meta.json``
records what the shards were made from, and a mismatch is an error, not a silent mix.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_path, write_json

log = logging.getLogger(__name__)


def prepare_texts(pivot_tokenizer, conversations: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Render each conversation in the pivot template; cut the TEXT after ``max_length`` pivot tokens.

    Cutting the text (not the token list) keeps every model on exactly the same characters.
    """
    from fusionlab.distill.conversations import render

    out = []
    for conv in conversations:
        text, spans = render(pivot_tokenizer, conv["messages"])
        enc = pivot_tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) > max_length:
            cut = int(enc["offset_mapping"][max_length - 1][1])
            text = text[:cut]
            spans = [(a, min(b, cut)) for a, b in spans if a < cut]
        out.append({"id": conv["id"], "text": text, "spans": spans})
    return out


def tokenize_with_spans(tokenizer, text: str, spans: list[tuple[int, int]], add_bos: bool,
                        max_length: int | None = None) -> dict[str, np.ndarray]:
    """Token ids, character offsets and the assistant mask (token span overlaps an assistant span)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    bos = getattr(tokenizer, "bos_token_id", None)
    if add_bos and bos is not None and (not ids or ids[0] != bos):
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    if max_length is not None:
        ids, offsets = ids[:max_length], offsets[:max_length]
    off = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in spans:
        mask |= (off[:, 0] < b) & (off[:, 1] > a)
    return {"input_ids": np.asarray(ids, dtype=np.int32), "offsets": off, "assistant": mask}


@torch.no_grad()
def _forward_topk(model, batch: list[np.ndarray], topk: int, device: torch.device):
    """Top-k logits/ids per position and per-position next-token CE for a right-padded batch."""
    lengths = [len(x) for x in batch]
    L = max(lengths)
    ids = torch.zeros(len(batch), L, dtype=torch.long)
    att = torch.zeros(len(batch), L, dtype=torch.long)
    for b, x in enumerate(batch):
        ids[b, :len(x)] = torch.from_numpy(x.astype(np.int64))
        att[b, :len(x)] = 1
    ids, att = ids.to(device), att.to(device)
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    vals, idx = logits.topk(topk, dim=-1)
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    tok_ce = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, L-1]: CE of predicting token t+1
    return [(vals[b, :n].cpu().numpy(), idx[b, :n].cpu().numpy().astype(np.int32), tok_ce[b, :n - 1].cpu().numpy())
            for b, n in enumerate(lengths)]


def _read_meta(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def extract_representations(model, tokenizer, texts: list[dict[str, Any]], out_dir: str | os.PathLike, *,
                            name: str, topk: int = 10, shard_size: int = 64, batch_size: int = 1,
                            add_bos: bool = False, max_length: int | None = None,
                            fingerprint: str = "", logits_dtype: str = "float32",
                            stop_after_shards: int | None = None) -> dict[str, int]:
    """Write representation shards of ``model`` over ``texts`` into ``out_dir``; resume if partial.

    Returns counts: ``kept``, ``dropped_nan``, ``dropped_no_assistant``, ``shards``, ``shards_skipped``.
    ``stop_after_shards`` simulates an interruption (tests).
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else len(tokenizer)
    meta = {"name": name, "vocab_size": vocab, "tokenizer_size": len(tokenizer), "topk": topk,
            "shard_size": shard_size, "n_texts": len(texts), "fingerprint": fingerprint, "add_bos": add_bos,
            "max_length": max_length, "logits_dtype": logits_dtype}
    old = _read_meta(out / "meta.json")
    if old is not None and old != meta:
        diff = sorted(k for k in meta if old.get(k) != meta[k])
        raise FusionlabError(f"Representation cache {str(out)!r} was made with different settings ({diff}: "
                             f"{ {k: old.get(k) for k in diff} } vs { {k: meta[k] for k in diff} }); delete it or "
                             "point distill.cache_dir elsewhere.")
    write_json(out / "meta.json", meta)
    device = next(model.parameters()).device
    n_shards = math.ceil(len(texts) / shard_size)
    totals = {"kept": 0, "dropped_nan": 0, "dropped_no_assistant": 0, "shards": n_shards, "shards_skipped": 0}
    written = 0
    for s in range(n_shards):
        shard_path, side_path = out / f"shard-{s:05d}.safetensors", out / f"shard-{s:05d}.json"
        if shard_path.is_file() and side_path.is_file():
            info = json.loads(side_path.read_text())
            totals["kept"] += len(info["ids"])
            totals["dropped_nan"] += info["dropped_nan"]
            totals["dropped_no_assistant"] += info["dropped_no_assistant"]
            totals["shards_skipped"] += 1
            continue
        if stop_after_shards is not None and written >= stop_after_shards:
            raise KeyboardInterrupt(f"stopped after {written} shards (simulated interruption)")
        chunk = texts[s * shard_size:(s + 1) * shard_size]
        rows, dropped_nan, dropped_none = [], 0, 0
        toks = [tokenize_with_spans(tokenizer, t["text"], t["spans"], add_bos, max_length) for t in chunk]
        for b0 in range(0, len(chunk), batch_size):
            group = toks[b0:b0 + batch_size]
            results = _forward_topk(model, [g["input_ids"] for g in group], topk, device)
            for t, g, (vals, idx, tok_ce) in zip(chunk[b0:b0 + batch_size], group, results):
                target = g["assistant"][1:]
                if not target.any():
                    dropped_none += 1
                    continue
                ce = float(tok_ce[target].mean())
                if not math.isfinite(ce) or not np.isfinite(vals).all():
                    dropped_nan += 1
                    continue
                rows.append((t["id"], g, vals, idx, ce))
        tensors = {
            "lengths": np.asarray([len(r[1]["input_ids"]) for r in rows], dtype=np.int64),
            "input_ids": _cat([r[1]["input_ids"] for r in rows], np.int32, ()),
            "offsets": _cat([r[1]["offsets"] for r in rows], np.int32, (2,)),
            "assistant": _cat([r[1]["assistant"].astype(np.uint8) for r in rows], np.uint8, ()),
            "topk_ids": _cat([r[3] for r in rows], np.int32, (topk,)),
            "topk_logits": _cat([r[2] for r in rows], np.dtype(logits_dtype), (topk,)),
            "ce": np.asarray([r[4] for r in rows], dtype=np.float32),
        }
        with atomic_path(shard_path) as tmp:
            save_file(tensors, str(tmp))
        write_json(side_path, {"ids": [r[0] for r in rows], "dropped_nan": dropped_nan,
                               "dropped_no_assistant": dropped_none})
        totals["kept"] += len(rows)
        totals["dropped_nan"] += dropped_nan
        totals["dropped_no_assistant"] += dropped_none
        written += 1
    if dropped := totals["dropped_nan"] + totals["dropped_no_assistant"]:
        log.warning("%s: dropped %d samples (%d NaN, %d without assistant tokens)", name, dropped,
                    totals["dropped_nan"], totals["dropped_no_assistant"])
    return totals


def _cat(parts: list[np.ndarray], dtype, tail: tuple) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros((0, *tail), dtype=dtype)


def load_representations(out_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """All samples of a representation directory: ``{id: {input_ids, offsets, assistant, topk_ids, topk_logits, ce}}``."""
    from safetensors.numpy import load_file

    out = Path(out_dir)
    meta = _read_meta(out / "meta.json")
    if meta is None:
        raise FusionlabError(f"No representations in {str(out)!r} (meta.json missing); run the extraction first.")
    samples: dict[str, dict[str, Any]] = {}
    for s in range(math.ceil(meta["n_texts"] / meta["shard_size"])):
        side = out / f"shard-{s:05d}.json"
        if not side.is_file():
            raise FusionlabError(f"Representation shard {s} missing in {str(out)!r}: the extraction was interrupted; "
                                 "rerun the job to resume it.")
        ids = json.loads(side.read_text())["ids"]
        t = load_file(str(out / f"shard-{s:05d}.safetensors"))
        bounds = np.concatenate([[0], np.cumsum(t["lengths"])])
        for n, sid in enumerate(ids):
            a, b = bounds[n], bounds[n + 1]
            samples[sid] = {"input_ids": t["input_ids"][a:b], "offsets": t["offsets"][a:b],
                            "assistant": t["assistant"][a:b].astype(bool), "topk_ids": t["topk_ids"][a:b],
                            "topk_logits": t["topk_logits"][a:b].astype(np.float32), "ce": float(t["ce"][n])}
    return samples


def resolve_derived_sources(dc):
    """``dc`` with every ``derived:<name>`` source path replaced by its fine-tuned checkpoint dir
    (:func:`fusionlab.merge.derive.derive_models` from the pivot's checkpoint, cached by all its inputs), so a
    source can be a variant of the pivot (same vocabulary: aligned by identity, no vocabulary mapping)."""
    import dataclasses

    from fusionlab.merge.derive import derive_models
    from fusionlab.models.resolve import DERIVED_PREFIX

    wanted = {n: s for n, s in dc.sources.items() if (s.path or "").startswith(DERIVED_PREFIX)}
    if not wanted:
        return dc
    dirs = derive_models({n: dc.derive[s.path.removeprefix(DERIVED_PREFIX)] for n, s in wanted.items()}, dc.pivot.path)
    sources = {n: dataclasses.replace(s, path=dirs[n]) if n in wanted else s for n, s in dc.sources.items()}
    return dataclasses.replace(dc, sources=sources)
