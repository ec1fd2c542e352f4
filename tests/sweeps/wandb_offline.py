"""Read W&B offline run files (``run-<id>.wandb``) so tests can check what a job logged.

The file is a LevelDB-style log (7-byte file header, 32 KiB blocks, records split into
FULL/FIRST/MIDDLE/LAST chunks) of ``wandb_internal_pb2.Record`` protobufs.
"""
from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Iterator

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"not a W&B run file: {ident!r} {magic:#x}"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if pos + length > len(data):  # a record still being written
            return
        chunk, pos = data[pos:pos + length], pos + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            buf = chunk
        elif kind == _MIDDLE:
            buf += chunk
        elif kind == _LAST:
            yield buf + chunk
            buf = b""


def read_records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for chunk in _chunks(Path(path).read_bytes()):
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def offline_runs(root: str | Path, wait_s: float = 30.0) -> list[dict]:
    """Every offline run below ``root``: id, group, name, job type, history keys, exit code.

    W&B's service process writes the file asynchronously, even after ``run.finish()`` returned:
    wait up to ``wait_s`` for every run's exit record.
    """
    deadline = time.monotonic() + wait_s
    while True:
        runs = _read_runs(root)
        if all(r["exit_code"] is not None for r in runs) or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def _read_runs(root: str | Path) -> list[dict]:
    runs = []
    for path in sorted(Path(root).rglob("offline-run-*/run-*.wandb")):
        info = {"path": path, "id": None, "group": None, "name": None, "job_type": None,
                "history_keys": set(), "exit_code": None}
        for rec in read_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info.update(id=rec.run.run_id, group=rec.run.run_group, name=rec.run.display_name,
                            job_type=rec.run.job_type)
            elif kind == "history":
                info["history_keys"] |= {item.key or "/".join(item.nested_key) for item in rec.history.item}
            elif kind == "exit":
                info["exit_code"] = rec.exit.exit_code
        runs.append(info)
    return runs
