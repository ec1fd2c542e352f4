"""Memory tricks of the merge engine: zero-copy mapped reads, page release, heap reuse.

See :mod:`fusionlab.merge.fast` for why they exist. :class:`MappedFiles` backs
:class:`fusionlab.merge.io.CheckpointReader`; :func:`reuse_freed_memory` wraps a whole merge.
"""
from __future__ import annotations

import ctypes
import mmap
import platform
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class MappedFiles:
    """Tensors that ARE the pages of private copy-on-write file mappings (no copy, no zero-filled buffer).

    Writing to such a tensor never changes the file, but another :meth:`tensor` of the same bytes
    sees the writes until :meth:`release`.
    """

    def __init__(self) -> None:
        self._maps: dict[Path, mmap.mmap] = {}

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            with open(path, "rb") as f:
                mm = self._maps[path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return mm

    def tensor(self, path: Path, start: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """``nbytes`` at byte ``start`` of ``path`` as a tensor of ``dtype`` and ``shape``."""
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        mm = self._map(path)
        if start % dtype.itemsize:  # misaligned for its dtype (possible after odd-sized tensors): copy it
            buf = torch.empty(nbytes, dtype=torch.uint8)
            buf.numpy()[:] = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=start)
            return buf.view(dtype).reshape(shape)
        return torch.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)

    def release(self, path: Path, start: int, end: int) -> None:
        """Drop the mapped pages of bytes ``[start, end)`` from this process (they stay in the OS page cache).

        Only whole pages inside the range go (the edge pages may hold other tensors). Call it only
        once nothing uses those tensors: a later read reads the file again.
        """
        mm = self._maps.get(path)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = end // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still uses the mapping: it is unmapped when that tensor goes
                pass
        self._maps.clear()


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """glibc only: while merging, keep freed blocks in the heap for the next tensor.

    By default glibc returns every large block (each tensor-sized buffer) to the OS when it is
    freed, and the next tensor's buffers are fresh pages the kernel must fault in and zero: about
    a third of a simple merge's time on a VM. Inside this block large allocations come from the
    heap and stay there; afterwards the defaults are set back (as fixed, not adaptive, thresholds)
    and the retained memory is trimmed.
    """
    try:
        libc = ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None
    except OSError:
        libc = None
    if libc is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    try:
        yield
    finally:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.malloc_trim(0)
