"""Streaming safetensors IO: read one tensor at a time from (sharded) checkpoints, write shards.

Memory stays at about one tensor per input model plus one output tensor: the reader hands out
tensors backed by the checkpoint files' mapped pages and drops them once merged
(:mod:`fusionlab.merge.fast.memory`); :class:`ShardWriter` writes every shard's header first (all
shapes are known from the plan) and then each tensor's bytes, in a background thread, while the
next tensor is being merged. It is the one writer of every checkpoint fusionlab.merge produces.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fusionlab.errors import FusionlabError
from fusionlab.io import read_json_object
from fusionlab.merge.fast.memory import MappedFiles
from fusionlab.models.loading import is_finite, non_finite_tensor

INDEX_NAME = "model.safetensors.index.json"
# Files copied from the tokenizer source into a merged checkpoint (besides config.json).
AUX_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
             "chat_template.json")
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "model.embed_in.weight",
               "word_embeddings.weight", "transformer.word_embeddings.weight")
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")
# safetensors' dtype codes (the file format's names, not a config option)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def parse_size(size: int | str) -> int:
    """``"5GB"``/``"500MB"``/``"5B"`` (mergekit's billions) or an int of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"([0-9.]+)\s*([KMGTB]?)B?", str(size).upper().strip())
    if not m:
        raise FusionlabError(f"Bad shard size {size!r}; write e.g. 5GB, 500MB or a number of bytes.")
    mult = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12}[m.group(2)]
    return int(float(m.group(1)) * mult)


def is_embedding(name: str) -> bool:
    """Token-indexed tensors: input embeddings and output head (their first axis is the vocabulary)."""
    return name in EMBED_NAMES or name in LM_HEAD_NAMES or name.endswith(("embed_tokens.weight", "lm_head.weight"))


def is_input_embedding(name: str) -> bool:
    """The input embedding (the token-indexed tensor before the layers; lm_head comes after them)."""
    return name in EMBED_NAMES or name.endswith("embed_tokens.weight")


class CheckpointReader:
    """Tensor names, shapes and lazy loads for an HF safetensors dir (sharded or not) or one file."""

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(path)
        if self.path.is_file():
            files = [self.path]
            self.dir = self.path.parent
        elif self.path.is_dir():
            self.dir = self.path
            index = self.path / INDEX_NAME
            if index.exists():
                weight_map = read_json_object(index, "checkpoint index").get("weight_map")
                if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                    raise FusionlabError(f"checkpoint index {str(index)!r} has no weight_map of tensor name -> file "
                                         "name; re-save the checkpoint (save_pretrained) or remove the index.")
                files = sorted({self.path / f for f in weight_map.values()})
            else:
                files = sorted(self.path.glob("*.safetensors"))
        else:
            raise FusionlabError(f"Checkpoint {self.label!r} does not exist ({self.path}); check the model path.")
        if not files:
            raise FusionlabError(
                f"No *.safetensors files in {self.path} ({self.label}); merging needs safetensors checkpoints "
                "(re-save with save_pretrained(..., safe_serialization=True))."
            )
        self._mapped = MappedFiles()
        self._data_start: dict[Path, int] = {}
        self.file_of: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self.offsets: dict[str, tuple[int, int]] = {}
        self.metadata: dict[str, str] = {}
        for f in files:
            header, start = read_header(f)
            self._data_start[f] = start
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in header.items():
                self.file_of[name] = f
                self.shape[name] = tuple(info["shape"])
                self.dtype[name] = info["dtype"]
                self.offsets[name] = tuple(info["data_offsets"])
            need = start + max((tuple(i["data_offsets"])[1] for i in header.values()), default=0)
            if f.stat().st_size < need:
                raise FusionlabError(f"{f} is truncated ({f.stat().st_size} bytes, its header needs {need}); "
                                     "re-download or re-save that checkpoint.")
        cfg = self.dir / "config.json"
        self.config: dict[str, Any] = (read_json_object(cfg, "model config") if cfg.exists() and self.path.is_dir()
                                       else {})

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    @property
    def tied(self) -> bool:
        """True when lm_head shares the input embedding (no separate lm_head tensor stored)."""
        return not any(n in self.file_of for n in LM_HEAD_NAMES) and bool(self.config.get("tie_word_embeddings", True))

    def resolve_name(self, name: str) -> str | None:
        """The stored name holding ``name``: itself, or the embedding for a tied lm_head."""
        if name in self.file_of:
            return name
        if name in LM_HEAD_NAMES and self.tied:
            for e in EMBED_NAMES:
                if e in self.file_of:
                    return e
        return None

    def get(self, name: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Tensor ``name`` (a tied lm_head gives the embedding), converted to ``dtype`` on ``device``; one holding
        NaN or inf (as stored, or once converted) is refused here, so no job merges, extracts or transplants it.

        An fp32 tensor read as fp32 on the CPU is backed by a private copy-on-write mapping of the
        file: writing to it never changes the file, but another ``get`` of the same tensor sees
        the writes until :meth:`release`.
        """
        stored = self.resolve_name(name)
        if stored is None:
            raise FusionlabError(f"Tensor {name!r} is missing from {self.label} ({self.path}).")
        t = self._read(stored)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device)
        if not is_finite(t):
            stored_ok = is_finite(self._read(stored))  # else the conversion to dtype overflowed
            raise non_finite_tensor(stored, self.label + (f" once converted to {dtype}" if stored_ok else ""))
        return t

    def _read(self, name: str) -> torch.Tensor:
        """The tensor's bytes, backed by the (copy-on-write) file mapping: no copy."""
        path = self.file_of[name]
        begin, end = self.offsets[name]
        dtype = ST_DTYPES.get(self.dtype[name])
        if dtype is None:
            raise FusionlabError(f"Tensor {name!r} in {path} has dtype {self.dtype[name]}, which fusionlab cannot read.")
        return self._mapped.tensor(path, self._data_start[path] + begin, end - begin, dtype, self.shape[name])

    def float_dtype(self) -> torch.dtype:
        """The dtype the floating tensors are stored in (what ``dtype: auto`` writes); fp32 if none."""
        return next((ST_DTYPES[d] for d in self.dtype.values() if d in ("F32", "BF16", "F16", "F64")), torch.float32)

    def release(self, name: str) -> None:
        """Drop a tensor's mapped pages from this process (they stay in the OS page cache).

        Only call this once nothing uses the tensor: a later read of it reads the file again.
        """
        stored = self.resolve_name(name)
        if stored is None:
            return
        path, (begin, end) = self.file_of[stored], self.offsets[stored]
        self._mapped.release(path, self._data_start[path] + begin, self._data_start[path] + end)

    def close(self) -> None:
        self._mapped.close()


def read_header(path: Path) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts (bounds-checked against
    the file size before reading: the guarded reader of fusionlab.io)."""
    from fusionlab.io import read_safetensors_header

    return read_safetensors_header(path)


class ShardWriter:
    """Write tensors straight to disk in a fixed order: shard layout and headers come from ``entries``.

    ``entries`` = [(name, shape, dtype)] in the order :meth:`write` will be called. Shards hold at most
    ``max_shard_bytes`` (one larger tensor gets a shard of its own). Files are safetensors: 8-byte
    header length, JSON header padded to 8 bytes, then the tensors' bytes in order. The bytes are
    written by one background thread (one write in flight), so disk time overlaps the next merge
    step; :meth:`finish` waits for it and renames the shards, :meth:`close` stops it on failure.
    """

    def __init__(self, out_dir: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = 5 * 10**9, metadata: dict[str, str] | None = None):
        if not entries:
            raise FusionlabError("Nothing to write: the checkpoint would have no tensors.")
        self.out_dir = Path(out_dir)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        self.order = [e[0] for shard in self.shards for e in shard]
        self.total_bytes = sum(e[3] for shard in self.shards for e in shard)
        self._next = 0  # index into self.order
        self._shard, self._left = -1, 0
        self._file = None  # owned by the background thread
        self._paths: list[Path] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fusionlab-writer")
        self._pending: Future | None = None

    def _header(self, shard: int) -> bytes:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype, nbytes in self.shards[shard]:
            header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob

    def _write_bytes(self, open_path: Path | None, header: bytes, size: int, t: torch.Tensor, last_in_shard: bool) -> None:
        if open_path is not None:
            self._file = open(open_path, "wb")
            if hasattr(os, "posix_fallocate"):
                try:  # reserve the whole shard once (fewer, larger extents; disk full fails here, early)
                    os.posix_fallocate(self._file.fileno(), 0, size)
                except OSError as e:
                    if e.errno == errno.ENOSPC:
                        raise FusionlabError(f"No space left for {open_path.name} ({size} bytes) in {self.out_dir}.") from e
            self._file.write(header)
        if t.numel():
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        if last_in_shard:
            self._file.close()
            self._file = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise RuntimeError(f"ShardWriter: got {name!r}, expected {expected!r}")
        open_path, header, size = None, b"", 0
        if self._left == 0:
            self._shard += 1
            self._left = len(self.shards[self._shard])
            open_path = self.out_dir / f".shard-{self._shard:05d}.safetensors"
            header = self._header(self._shard)
            size = len(header) + sum(e[3] for e in self.shards[self._shard])
            self._paths.append(open_path)
        _, shape, dtype, _ = self.shards[self._shard][len(self.shards[self._shard]) - self._left]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"ShardWriter: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, "
                               f"planned {shape} {dtype}")
        t = tensor.detach().to("cpu").contiguous()
        self._next += 1
        self._left -= 1
        self._wait()
        self._pending = self._pool.submit(self._write_bytes, open_path, header, size, t, self._left == 0)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write (e.g. disk full) here

    def close(self) -> None:
        """Stop the background writer and close the open shard (after a failure; finish() calls it too)."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            if self._file is not None:
                self._file.close()
                self._file = None

    def finish(self) -> list[Path]:
        self.close()
        if self._next != len(self.order):
            raise RuntimeError(f"ShardWriter: {len(self.order) - self._next} tensors were never written")
        n = len(self._paths)
        final = ([self.out_dir / "model.safetensors"] if n == 1 else
                 [self.out_dir / f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for tmp, dst, entries in zip(self._paths, final, self.shards):
            os.replace(tmp, dst)
            weight_map.update({e[0]: dst.name for e in entries})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return final


def copy_aux_files(src_dir: Path, out_dir: Path, config_overrides: dict[str, Any] | None = None) -> None:
    """Copy config.json (with ``config_overrides``), generation config and tokenizer files."""
    cfg = src_dir / "config.json"
    if cfg.exists():
        config = read_json_object(cfg, "model config")
        config.update(config_overrides or {})
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in AUX_FILES:
        if (src_dir / name).exists():
            shutil.copy2(src_dir / name, out_dir / name)


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, config: dict[str, Any] | None = None,
                    max_shard_bytes: int = 5 * 10**9) -> None:
    """Write a whole state dict as (sharded) safetensors plus config.json (for tests and fixtures)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    w = ShardWriter(out_dir, [(k, tuple(v.shape), v.dtype) for k, v in state.items()], max_shard_bytes)
    try:
        for k, v in state.items():
            w.write(k, v)
        w.finish()
    finally:
        w.close()
    if config is not None:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
