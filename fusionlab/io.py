"""Files in and out: atomic writes (outputs appear whole or not at all) and guarded reads.

Writes go to a temp path beside the target, named ``.<name>.<host>-<pid>.<random>.tmp`` so that a
later run can tell a dead process's leftovers from a live writer's and remove them
(:func:`clean_stale_temps`), and are renamed into place when complete, with the user's umask
(``tempfile`` alone would leave them 0600 / 0700). A directory written by :func:`atomic_dir`
carries :data:`OUTPUT_MARKER`: ``overwrite=True`` replaces only such a directory, never one
fusionlab did not write, and never follows a symlink.

Reads of user files (JSONL, JSON, YAML, safetensors headers, GGUF headers, torch checkpoints) go
through the ``read_*`` / ``check_*`` functions here: a format error becomes a
:class:`~fusionlab.errors.FusionlabError` naming the file (and line), what is wrong and what to do.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from fusionlab.errors import FusionlabError

log = logging.getLogger(__name__)

OUTPUT_MARKER = ".fusionlab-output"  # in every directory atomic_dir writes: proof that fusionlab owns it
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


# ----------------------------------------------------------------------------------------- writes
def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask would, briefly, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host"


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_host()}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(directory: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temp files/dirs in ``directory`` left by dead processes of this host (kill -9, power loss);
    only those of target ``name`` when given. A live writer's temp path is never touched."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    host = _host()
    for entry in directory.iterdir():
        m = _TEMP.match(entry.name)
        if not m or m["host"] != host or (name is not None and m["name"] != name) or _pid_alive(int(m["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return Path(tmp)


def scratch_dir(parent: str | os.PathLike, name: str) -> Path:
    """A private temp dir in ``parent`` for work that is deleted afterwards, named so that the leftovers of a
    killed process are recognised and removed by the next call (and by :func:`clean_stale_temps`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(parent, name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(parent / name), suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temp path beside ``path`` to write to; renamed onto ``path`` when the block succeeds,
    removed when it fails (``suffix``: for writers that pick the format from the file name)."""
    path = Path(path)
    tmp = _tmp_sibling(path, suffix)
    try:
        yield tmp
        pause_for_tests(f"write:{path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temp file beside ``path`` and rename it into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def _clean(value: Any) -> Any:
    """NaN/inf are not JSON: write them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(_clean(obj), indent=2, default=_json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    lines = [json.dumps(_clean(r), ensure_ascii=False, default=_json_default) for r in rows]
    return atomic_write_text(path, "".join(line + "\n" for line in lines))


def check_output_path(path: str | os.PathLike, overwrite: bool = False, *, owned: bool = False,
                      key: str = "the output path") -> Path:
    """Refuse an output path before any work: a symlink, an existing output without ``overwrite``, or
    (with ``overwrite``) an existing path fusionlab did not write (no :data:`OUTPUT_MARKER`).
    ``owned``: the caller knows the path is fusionlab's own (a cache entry), so it may be replaced."""
    path = Path(path)
    if path.is_symlink():
        raise FusionlabError(f"{key} {str(path)!r} is a symlink (to {os.readlink(path)!r}); fusionlab never "
                             "writes through or replaces a link: give the real path instead.")
    if not path.exists() or owned:
        return path
    if not overwrite:
        raise FusionlabError(f"{key} {str(path)!r} already exists; choose another output path, or set overwrite=true "
                             "(e.g. merge.overwrite=true) to replace an output fusionlab wrote.")
    if not (path.is_dir() and (path / OUTPUT_MARKER).is_file()):
        raise FusionlabError(f"{key} {str(path)!r} exists but was not written by fusionlab (no {OUTPUT_MARKER} "
                             "marker), so overwrite=true will not replace it; remove it yourself or choose "
                             "another output path.")
    return path


def check_not_an_input(path: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike]],
                       key: str = "the output path") -> None:
    """Refuse an output that is one of the job's inputs or holds one: replacing it (overwrite=true, a marker from an
    earlier fusionlab run) would delete the input the job reads — e.g. a merge written over one of its models."""
    out = Path(path).expanduser().resolve()
    for label, where in inputs:
        source = Path(where).expanduser().resolve()
        if source == out or out in source.parents:
            what = "is" if source == out else "holds"
            where_ = "" if str(source) in label else f" ({str(source)!r})"
            raise FusionlabError(f"{key} {str(path)!r} {what} the {label}{where_}, which this job reads: writing "
                                 "there would replace its input. Choose another output path.")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, *, owned: bool = False) -> Iterator[Path]:
    """Yield a temp directory beside ``path``; rename it to ``path`` only if the block succeeds.

    The target is checked first (:func:`check_output_path`), before the block does any work. On any
    exception the temp directory is removed and ``path`` is left untouched.
    """
    path = check_output_path(path, overwrite, owned=owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path.parent, path.name)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        pause_for_tests(f"write:{path.name}")
        (tmp / OUTPUT_MARKER).write_text("written by fusionlab; overwrite=true may replace this directory\n")
        check_output_path(path, overwrite, owned=owned)  # nothing appeared meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
            os.replace(path, old / "old")  # move aside first: never a moment without a whole output
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------------------ reads
USER_TEXT = "utf-8-sig"  # UTF-8, with or without the byte-order mark some editors (Notepad, Excel) put first


@contextlib.contextmanager
def _reading_user_text(path: Path, what: str) -> Iterator[None]:
    """A user's text file that cannot be read as text: one message naming it and why, whatever the reader."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise FusionlabError(f"{what} {str(path)!r} is not UTF-8 text ({e}); is it the right file?") from None
    except IsADirectoryError:
        raise FusionlabError(f"{what} {str(path)!r} is a directory; give the .jsonl file.") from None
    except FileNotFoundError:
        raise FusionlabError(f"{what} {str(path)!r} does not exist; check the path.") from None


def read_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> list[dict]:
    """The JSON objects of a JSONL file, one per non-empty line; a bad line names the file and line."""
    path = Path(path)
    rows = []
    with _reading_user_text(path, what), open(path, encoding=USER_TEXT) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise FusionlabError(f"{what} {str(path)!r}, line {number}, is not valid JSON ({e}); fix or "
                                     "remove that line (each line holds one JSON object).") from None
            if not isinstance(row, dict):
                raise FusionlabError(f"{what} {str(path)!r}, line {number}, holds a {type(row).__name__}, not "
                                     "a JSON object ({...}); each line must be one object with the fields this "
                                     "file needs.")
            rows.append(row)
    return rows


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding=USER_TEXT))
    except (ValueError, UnicodeDecodeError) as e:
        raise FusionlabError(f"{what} {str(path)!r} is not valid JSON ({e}); fix or replace it.") from None
    except OSError as e:
        raise FusionlabError(f"cannot read {what} {str(path)!r} ({e.strerror or e}); check the path.") from None


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold one object (a config.json, an index, an adapter config)."""
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise FusionlabError(f"{what} {str(path)!r} holds a {type(value).__name__}, not a JSON object ({{...}}); "
                             "fix or replace it.")
    return value


def read_yaml(path: str | os.PathLike, what: str = "YAML file") -> Any:
    import yaml

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding=USER_TEXT))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f", line {where.line + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise FusionlabError(f"{what} {str(path)!r}{at}, is not valid YAML ({problem}); fix it.") from None
    except UnicodeDecodeError as e:
        raise FusionlabError(f"{what} {str(path)!r} is not UTF-8 text ({e}); is it the right file?") from None
    except OSError as e:
        raise FusionlabError(f"cannot read {what} {str(path)!r} ({e.strerror or e}); check the path.") from None


SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors format's own limit on the JSON header


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """A safetensors file's JSON header and the byte offset where its data starts, bounds-checked
    against the file's size before anything is allocated, and every tensor's extent checked."""
    path = Path(path)
    fix = "re-download or re-save that checkpoint (save_pretrained(..., safe_serialization=True))"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise FusionlabError(f"{str(path)!r} is not a safetensors file ({size} bytes: too short); {fix}.")
            n = struct.unpack("<Q", head)[0]
            if n > min(size - 8, SAFETENSORS_MAX_HEADER):
                raise FusionlabError(f"{str(path)!r} is truncated or not a safetensors file (its header claims "
                                     f"{n} bytes, the file has {size}); {fix}.")
            raw = f.read(n)
    except OSError as e:
        raise FusionlabError(f"cannot read {str(path)!r} ({e.strerror or e}); check the path.") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise FusionlabError(f"{str(path)!r} is not a valid safetensors file (bad header: {e}); {fix}.") from None
    if size < 8 + n + end:
        raise FusionlabError(f"{str(path)!r} is truncated ({size} bytes, its header needs {8 + n + end}); {fix}.")
    return header, 8 + n


GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | os.PathLike) -> Path:
    """A GGUF file that parses: magic, version, and tensor data within the file (cheap: memory-mapped)."""
    path = Path(path)
    fix = "re-download the .gguf file (or check model.path)"
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise FusionlabError(f"cannot read GGUF file {str(path)!r} ({e.strerror or e}); check model.path.") from None
    if magic != GGUF_MAGIC:
        raise FusionlabError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes); {fix}.")
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses every header field and maps every tensor: a truncation fails here
    except ImportError:
        return path
    except Exception as e:  # the reader raises ValueError, IndexError, struct errors ... on broken files
        raise FusionlabError(f"GGUF file {str(path)!r} is truncated or corrupt ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'unreadable'}); {fix}.") from None
    return path


def check_lightning_checkpoint(path: Path, key: str, value: str) -> None:
    """A resume checkpoint must be what Lightning reads: a ``torch.save`` zip, or a sharded checkpoint directory
    (DeepSpeed's holds ``latest``, FSDP's ``meta.pt``). Checked from the name and the zip index only, so a
    corrupt or truncated file fails at config time, not after the representations are extracted."""
    if path.is_dir():
        if (path / "latest").is_file() or (path / "meta.pt").is_file():
            return
        inside = sorted(p.name for p in path.glob("*.ckpt"))[:3]
        hint = f" (it holds {inside}: give one of them)" if inside else ""
        raise FusionlabError(f"{key}={value!r} is a directory, not a checkpoint{hint}; give a .ckpt file "
                             "(e.g. <run dir>/checkpoints/last.ckpt), auto or false.")
    import zipfile

    if not zipfile.is_zipfile(path):
        raise FusionlabError(f"{key}={value!r} is not a Lightning checkpoint (not the zip archive torch.save "
                             "writes: truncated, corrupt or another kind of file); give a .ckpt a fit wrote, auto or "
                             "false (start over).")


def torch_load(path: str | os.PathLike, what: str = "checkpoint", **kwargs: Any) -> Any:
    """``torch.load(weights_only=True)``: a file that needs arbitrary pickled code is refused, shortly."""
    import pickle

    import torch

    path = Path(path)
    try:
        return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise FusionlabError(f"{what} {str(path)!r} holds pickled Python objects that fusionlab does not "
                                 "load (torch.load(weights_only=True) refuses them: they could run code); "
                                 "re-save it with plain tensors, or as safetensors.") from None
        raise FusionlabError(f"{what} {str(path)!r} is not a torch checkpoint or is corrupt ({first}); "
                             "re-create it.") from None
    except (RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FusionlabError(f"{what} {str(path)!r} is truncated or corrupt ({first}); re-create it.") from None
    except OSError as e:
        raise FusionlabError(f"cannot read {what} {str(path)!r} ({e.strerror or e}); check the path.") from None


# ----------------------------------------------------------------------------------- cache entries
MANIFEST = "fusionlab-manifest.json"
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 16


def content_hash(path: str | os.PathLike) -> str:
    """A hash of a file's size and 16 evenly spaced 64 KiB blocks (first and last included): it catches
    truncation, a partial copy and overwritten regions without reading a multi-GB checkpoint whole."""
    import hashlib

    path = Path(path)
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    with open(path, "rb") as f:
        if size <= _SAMPLES * _SAMPLE_BYTES:
            h.update(f.read())
        else:
            step = (size - _SAMPLE_BYTES) // (_SAMPLES - 1)
            for i in range(_SAMPLES):
                f.seek(i * step)
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def write_manifest(directory: str | os.PathLike) -> Path:
    """Record every file's size and :func:`content_hash` in ``<directory>/fusionlab-manifest.json`` (call it
    on the temp dir of an :func:`atomic_dir`, after the last file is written)."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "hash": content_hash(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in (MANIFEST, OUTPUT_MARKER)}
    write_json(directory / MANIFEST, {"version": 1, "files": files})
    return directory / MANIFEST


def manifest_problem(directory: str | os.PathLike) -> str | None:
    """Why a cache entry written with :func:`write_manifest` cannot be used (None: it is intact)."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {MANIFEST} (an interrupted or older write)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"its {MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        p = directory / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != want["size"]:
            return f"{name} has {p.stat().st_size} bytes, {want['size']} were written"
        if content_hash(p) != want["hash"]:
            return f"{name}'s content changed since it was written"
    return None


def intact_cache_entry(directory: str | os.PathLike, what: str) -> bool:
    """Whether a cache entry (written with :func:`write_manifest`) exists and is whole. A damaged one — a file
    truncated or altered since, or no manifest (an interrupted or older write) — is reported here, once, and the
    caller builds it again: never used, never a traceback later."""
    directory = Path(directory)
    if not directory.exists():
        return False
    problem = manifest_problem(directory)
    if problem is None:
        return True
    log.warning("The cached %s at %s cannot be used (%s): building it again.", what, directory, problem)
    return False


def pause_for_tests(stage: str) -> None:
    """A real pause at a known point of a real write, for the kill -9 tests: with ``FUSIONLAB_TEST_PAUSE=<stage>``
    it prints ``paused <stage>`` and sleeps, and the test kills the process there. Unset: a no-op. Every
    atomic write pauses at ``write:<target name>``, its content complete and not yet renamed into place."""
    if os.environ.get("FUSIONLAB_TEST_PAUSE") == stage:
        import sys
        import time

        print(f"paused {stage}", file=sys.stderr, flush=True)
        time.sleep(600)
