"""Chat Vector (Huang et al. 2023): τ = θ_chat − θ_base, then θ_cp + Σ ratioᵢ τᵢ.

Differences from the reference scripts (aqweteddy/ChatVector):

- ``special_tokens_map`` ({cp_token_id: chat_token_id}) sets those embedding / lm_head rows of the
  result to Σ ratioᵢ · (row of the CHAT model) — the reference stored the BASE model's rows under
  the name ``chat_embed`` and used those.
- a vocabulary-size mismatch is a clear error unless ``skip_embed`` (which leaves the embeddings
  and lm_head of the cp model alone, apart from mapped special rows).
- tied embeddings: a checkpoint without an lm_head tensor uses its input embedding for it.
- streaming and atomic like every merge: one tensor at a time, written to a temp dir first.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import atomic_dir, check_not_an_input
from fusionlab.merge.config import build
from fusionlab.merge.derive import DeriveSpec, PerplexityEval
from fusionlab.merge.io import CheckpointReader, ShardWriter, copy_aux_files, is_embedding, parse_size
from fusionlab.models.loading import is_finite
from fusionlab.models.resolve import DERIVED_PREFIX, resolve_checkpoint, torch_dtype

CHAT_ROWS = "chat_rows."  # prefix of the chat model's full embedding rows stored with a chat vector
TOKENIZER_SOURCES = ("cp", "chat")  # whose tokenizer files the result gets (its weights config is always cp's)


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor", disable=not progress or not sys.stderr.isatty())


def _vocab_error(name: str, a, b, what: str) -> FusionlabError:
    return FusionlabError(
        f"Vocabulary size mismatch in {name!r}: {what} ({list(a)} vs {list(b)}). Chat vectors of models with "
        "different vocabularies cannot be added row by row; set skip_embed=true (and special_tokens_map for "
        "the chat special tokens) to leave embeddings and lm_head alone."
    )


def extract(base: str, chat: str, output: str | Path, skip_embed: bool = False, dtype: str = "float32",
            overwrite: bool = False, progress: bool = True, shard_size: str | int = "5GB") -> dict[str, Any]:
    """Write τ = chat − base as safetensors (plus the chat model's embedding rows, config and tokenizer)."""
    rb = CheckpointReader(resolve_checkpoint(base), f"base model {base!r}")
    rc = CheckpointReader(resolve_checkpoint(chat), f"chat model {chat!r}")
    check_not_an_input(output, [(rb.label, rb.dir), (rc.label, rc.dir)], key="the chat vector output")
    for key in ("model_type", "architectures"):
        if rb.config.get(key) != rc.config.get(key):
            raise FusionlabError(f"Architecture mismatch: base has {key}={rb.config.get(key)!r}, chat has "
                                 f"{rc.config.get(key)!r}; a chat vector needs the same architecture.")
    out_dtype = torch_dtype(dtype)
    names = []
    for name in rc.names:
        stored = rb.resolve_name(name)
        if stored is None:
            raise FusionlabError(f"Tensor {name!r} of the chat model is missing from the base model {base!r}.")
        if rb.shape[stored] != rc.shape[name]:
            if is_embedding(name):
                if skip_embed:
                    continue
                raise _vocab_error(name, rb.shape[stored], rc.shape[name], "base vs chat")
            raise FusionlabError(f"Shape mismatch for tensor {name!r}: base {list(rb.shape[stored])}, chat {list(rc.shape[name])}.")
        if skip_embed and is_embedding(name):
            continue
        names.append(name)
    rows = [name for name in rc.names if is_embedding(name)]  # the chat model's own rows, for special_tokens_map
    entries = [(n, rc.shape[n], out_dtype) for n in names] + [(CHAT_ROWS + n, rc.shape[n], out_dtype) for n in rows]
    meta = {"fusionlab": "chat_vector", "base": str(base), "chat": str(chat), "skip_embed": str(skip_embed)}
    with atomic_dir(output, overwrite=overwrite) as tmp:
        w = ShardWriter(tmp, entries, parse_size(shard_size), metadata=meta)
        try:
            for name in _bar(names, "extract chat vector", progress):
                c, b = rc.get(name), rb.get(name)  # finite (CheckpointReader.get refuses NaN/inf)
                w.write(name, (c - b).to(out_dtype))
                del c, b
                rc.release(name)  # mapped pages out of this process once used
                rb.release(name)
            for name in rows:
                w.write(CHAT_ROWS + name, rc.get(name).to(out_dtype))
            w.finish()
        finally:
            w.close()
        copy_aux_files(rc.dir, tmp)  # chat config + tokenizer: `tokenizer_source=chat` reuses them
        (tmp / "chat_vector.json").write_text(json.dumps(meta, indent=2) + "\n")
    return {"cv_tensors": len(names), "cv_bytes": w.total_bytes}


def add(cp: str, vectors: list[str], ratios: list[float] | float, output: str | Path, skip_embed: bool = False,
        special_tokens_map: dict[int, int] | None = None, tokenizer_source: str = "cp", dtype: str = "auto",
        overwrite: bool = False, progress: bool = True, shard_size: str | int = "5GB") -> dict[str, Any]:
    """θ_cp + Σ ratioᵢ τᵢ, streamed tensor by tensor; see the module docstring for the special rows."""
    if isinstance(ratios, (int, float)):
        ratios = [float(ratios)] * len(vectors)
    if len(ratios) != len(vectors):
        raise FusionlabError(f"{len(vectors)} chat vectors but {len(ratios)} ratios; give one ratio per vector.")
    if not vectors:
        raise FusionlabError("add() needs at least one chat vector.")
    if tokenizer_source not in TOKENIZER_SOURCES:
        raise FusionlabError(f"tokenizer_source must be one of {list(TOKENIZER_SOURCES)}, got {tokenizer_source!r}.")
    rp = CheckpointReader(resolve_checkpoint(cp), f"cp model {cp!r}")
    cvs = [CheckpointReader(Path(v).expanduser(), f"chat vector {v!r}") for v in vectors]
    check_not_an_input(output, [(r.label, r.dir) for r in (rp, *cvs)], key="the chat-vector model output")
    smap = {int(k): int(v) for k, v in (special_tokens_map or {}).items()}

    plan = []
    for name in rp.names:
        emb = is_embedding(name)
        if emb and skip_embed:
            plan.append((name, []))
            continue
        stored = []
        for cv in cvs:
            s = cv.resolve_name(name)
            if s is None:
                hint = " (it was extracted with skip_embed=true; use skip_embed=true here too)" if emb else ""
                raise FusionlabError(f"Tensor {name!r} is missing from {cv.label}{hint}.")
            if cv.shape[s] != rp.shape[name]:
                if emb:
                    raise _vocab_error(name, rp.shape[name], cv.shape[s], f"cp model vs {cv.label}")
                raise FusionlabError(f"Shape mismatch for tensor {name!r}: cp {list(rp.shape[name])}, {cv.label} {list(cv.shape[s])}.")
            stored.append(s)
        plan.append((name, stored))
    if smap:
        vocab = next((rp.shape[n][0] for n in rp.names if is_embedding(n)), None)
        for cp_id, chat_id in smap.items():
            if vocab is not None and not 0 <= cp_id < vocab:
                raise FusionlabError(f"special_tokens_map: cp token id {cp_id} is outside the cp vocabulary (size {vocab}).")
            for cv in cvs:
                rows = [n for n in cv.names if n.startswith(CHAT_ROWS)]
                if not rows:
                    raise FusionlabError(f"{cv.label} has no chat embedding rows; re-extract it with fusionlab.")
                if not 0 <= chat_id < cv.shape[rows[0]][0]:
                    raise FusionlabError(f"special_tokens_map: chat token id {chat_id} is outside the chat vocabulary "
                                         f"(size {cv.shape[rows[0]][0]}).")

    out_dtype = rp.float_dtype() if dtype == "auto" else torch_dtype(dtype)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        entries = [(name, rp.shape[name], out_dtype) for name, _ in plan]
        w = ShardWriter(tmp, entries, parse_size(shard_size), metadata={"fusionlab": "chat_vector_add"})
        try:
            for name, stored in _bar(plan, "add chat vector", progress):
                out = rp.get(name).clone()  # our own buffer: the mapped file pages are released below
                if not is_finite(out):
                    raise FusionlabError(f"Tensor {name!r} of the cp model contains NaN or inf.")
                for cv, s, r in zip(cvs, stored, ratios):
                    out.add_(cv.get(s), alpha=r)
                if smap and is_embedding(name):
                    rows = torch.zeros((len(smap), out.shape[1]), dtype=out.dtype)
                    for cv, r in zip(cvs, ratios):
                        key = CHAT_ROWS + name
                        if key not in cv.file_of:  # tied chat model: its lm_head rows are its embedding rows
                            key = next(n for n in cv.names if n.startswith(CHAT_ROWS))
                        chat_rows = cv.get(key)
                        rows += r * chat_rows[list(smap.values())]
                    out[list(smap.keys())] = rows
                if not is_finite(out):
                    raise FusionlabError(f"Adding the chat vector produced NaN or inf in tensor {name!r}.")
                w.write(name, out.to(out_dtype))
                del out
                rp.release(name)
                for cv, s in zip(cvs, stored):
                    if s:
                        cv.release(s)
            w.finish()
        finally:
            w.close()
        src = rp.dir if tokenizer_source == "cp" else cvs[-1].dir
        copy_aux_files(rp.dir, tmp, {"dtype": str(out_dtype).removeprefix("torch.")})
        if src != rp.dir:  # chat template / special tokens from the chat model, weights config from cp
            for f in src.iterdir():
                if f.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
                    (tmp / f.name).write_bytes(f.read_bytes())
    return {"cv_added": len(vectors), "cv_tensors_changed": sum(1 for _, s in plan if s)}


@dataclass
class ChatVectorConfig:
    """The ``chat_vector:`` node (job ``chat_vector``, ``conf/experiment/chat_vector.yaml``): τᵢ = chatᵢ − base
    saved, then cp + Σ ratioᵢ τᵢ. Models are checkpoint dirs, embedded names or ``derived:<name>``."""

    base: str  # the pre-trained model
    chat: Any  # its chat fine-tune, or a list of them
    cp: str  # its continual pre-training
    ratio: Any = 1.0  # a number, or a list with one ratio per chat model
    skip_embed: bool = False  # leave embeddings and lm_head alone (vocabularies differ)
    # {cp_token_id: chat_token_id}: rows from the chat model (empty by default, not None: OmegaConf cannot merge
    # a {...} override into a None node)
    special_tokens_map: dict[int, int] | None = field(default_factory=dict)
    tokenizer_source: str = "cp"  # cp | chat (the chat model's template and special tokens)
    dtype: str = "auto"  # output dtype; auto = the cp model's
    output: str | None = None  # default: <run dir>/merged
    vector_output: str | None = None  # default: <run dir>/chat_vectors
    overwrite: bool = False
    progress: bool = True
    shard_size: str = "5GB"  # "5GB", "500MB" or a number of bytes
    derive: dict[str, DeriveSpec] = field(default_factory=dict)  # name -> fine-tune of base, as derived:<name>
    eval: PerplexityEval | None = None  # perplexity of base, cp, chat model(s) and the result

    def __post_init__(self) -> None:
        self.derive = {n: build(DeriveSpec, s, f"chat_vector.derive.{n}") for n, s in self.derive.items()}
        self.eval = build(PerplexityEval, self.eval, "chat_vector.eval") if self.eval is not None else None
        if not self.chats or not all(isinstance(c, str) and c for c in self.chats):
            raise FusionlabError(f"chat_vector.chat={self.chat!r}: give a model (dir, embedded name, derived:<name>) "
                                 "or a list of them.")
        ratios = self._ratio_list()
        if len(ratios) != len(self.chats) or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                      for r in ratios):
            raise FusionlabError(f"chat_vector.ratio={self.ratio!r}: give a number, or a list of {len(self.chats)} "
                                 "numbers (one per chat model).")
        if self.tokenizer_source not in TOKENIZER_SOURCES:
            raise FusionlabError(f"chat_vector.tokenizer_source={self.tokenizer_source!r}: use one of "
                                 f"{list(TOKENIZER_SOURCES)}.")
        if self.dtype != "auto":
            torch_dtype(self.dtype, "chat_vector.dtype")
        parse_size(self.shard_size)
        for ref in [self.base, self.cp, *self.chats]:
            if ref.startswith(DERIVED_PREFIX) and ref.removeprefix(DERIVED_PREFIX) not in self.derive:
                raise FusionlabError(f"Model {ref!r} is not defined under chat_vector.derive "
                                     f"(defined: {sorted(self.derive)}).")

    @property
    def chats(self) -> list[str]:
        return list(self.chat) if isinstance(self.chat, (list, tuple)) else [self.chat]

    def _ratio_list(self) -> list[Any]:
        return list(self.ratio) if isinstance(self.ratio, (list, tuple)) else [self.ratio] * len(self.chats)

    @property
    def ratios(self) -> list[float]:
        """One ratio per chat model."""
        return [float(r) for r in self._ratio_list()]

    def for_run(self, run_dir: Path) -> "ChatVectorConfig":
        """This config with the output dirs a run writes to where unset (``<run_dir>/merged``, ``/chat_vectors``)."""
        return replace(self, output=self.output or str(run_dir / "merged"),
                       vector_output=self.vector_output or str(run_dir / "chat_vectors"))

    def models(self) -> dict[str, str]:
        """Label → reference of every model the job scores (the result as ``merged``)."""
        chats = {f"chat{'' if len(self.chats) == 1 else i}": c for i, c in enumerate(self.chats)}
        return {"base": self.base, "cp": self.cp, **chats, "merged": str(self.output)}


def transfer(cfg: ChatVectorConfig, derived: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Extract each τᵢ = chatᵢ − base into ``vector_output/cv<i>``, then write cp + Σ ratioᵢ τᵢ to ``output``
    (see :meth:`ChatVectorConfig.for_run`); ``derived``: name → dir of the ``derived:<name>`` models."""
    if not cfg.output or not cfg.vector_output:
        raise FusionlabError("chat_vector.output and vector_output must be set (ChatVectorConfig.for_run sets both).")

    def path(ref: str) -> str:  # a peft LoRA dir stands for base + LoRA (fusionlab.merge.lora.resolve_lora)
        from fusionlab.merge.lora import resolve_lora

        return str(resolve_lora(resolve_checkpoint(ref, derived), resolve_checkpoint(cfg.base, derived)))

    common = {"overwrite": cfg.overwrite, "progress": cfg.progress, "shard_size": cfg.shard_size}
    metrics: dict[str, Any] = {}
    vectors = []
    for i, chat in enumerate(cfg.chats):
        out = Path(cfg.vector_output) / f"cv{i}"
        info = extract(path(cfg.base), path(chat), out, skip_embed=cfg.skip_embed, **common)
        vectors.append(str(out))
        metrics.update({f"{k}/{i}": v for k, v in info.items()})
    metrics.update(add(path(cfg.cp), vectors, cfg.ratios, cfg.output, skip_embed=cfg.skip_embed,
                       special_tokens_map=cfg.special_tokens_map, tokenizer_source=cfg.tokenizer_source,
                       dtype=cfg.dtype, **common))
    return {**metrics, "merge_output": cfg.output}
