"""Measurements shared by the CLI and the benchmarks: peak RSS, disk read speed, the page cache."""
from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections import deque

import numpy as np

from .runtime.arena import Arena
from .runtime.load import Load
from .runtime.io import make_io, open_reader
from .runtime.trace import Trace


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), the kernel's own figure."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def evict_page_cache(path: str | os.PathLike) -> None:
    """Drop the file's pages from the page cache, so the next read comes from the disk."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def files_of(paths) -> list[str]:
    """The regular files named by `paths` (a path or a list of them); folders count as all files under them."""
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            out += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
        elif os.path.exists(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder to measure the page cache of")
    return out


_libc = None


def _mincore_libc():
    """libc with mmap/mincore/munmap typed for 64-bit pointers (ctypes would truncate them to int)."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc = lib
    return _libc


def page_cache_bytes(paths) -> int:
    """Bytes of these files (or of every file under these folders) now held in the page cache.

    The cache is memory a user pays for even though no process's RSS shows it: a system that reads its
    weights through the cache (mmap, buffered reads) keeps them there after the call. Measured with
    mincore(2) over a fresh read-only mapping of each file: mapping touches no page, so measuring does
    not change what it measures (no external tool such as fincore is needed).
    """
    libc, page, total = _mincore_libc(), mmap.PAGESIZE, 0
    for path in files_of(paths):
        size = os.path.getsize(path)
        if size == 0:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), f"mmap of {path} for mincore failed")
            try:
                vec = ctypes.create_string_buffer((size + page - 1) // page)
                if libc.mincore(addr, size, vec) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore on {path} failed")
                resident = int((np.frombuffer(vec.raw, np.uint8) & 1).sum())  # bit 0: page resident
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
        total += min(resident * page, size)  # the last page may be partly past the end
    return total


def evict_files(paths) -> None:
    """evict_page_cache for every file under `paths` (files or folders)."""
    for path in files_of(paths):
        evict_page_cache(path)


def disk_read_bps(path: str | os.PathLike, mode: str = "auto", io: str = "auto",
                  max_bytes: int = 2 * 2**30) -> tuple[float, str]:
    """Read speed of `path` with the streaming reader (same mode, backend and chunking), in bytes/s.

    Reads up to `max_bytes` of the file through a small reused buffer, so it costs no memory, and
    evicts the file's pages first so a buffered reader is measured against the disk, not the cache.
    Returns (bytes per second, "mode/backend").
    """
    path = os.fspath(path)
    evict_page_cache(path)
    reader = open_reader(path, mode)
    backend = make_io(reader, Trace(enabled=False), io)
    slots, chunk = 4, backend.chunk_bytes  # 4 reads in flight reach the ceiling; few MiB of memory
    arena = Arena(slots * chunk, slots * chunk)
    size = min(reader.size - reader.size % 4096, max_bytes)
    try:
        t0 = time.perf_counter()
        loads: deque[Load] = deque()
        for i, off in enumerate(range(0, size, chunk)):
            if len(loads) == slots:
                backend.wait(loads.popleft())  # its slot is reused next
            load = Load(-1, None, (i % slots) * chunk, chunk)
            n = min(chunk, size - off)
            backend.submit(load, arena, [(load.addr, off, n, n)])
            loads.append(load)
        for load in loads:
            backend.wait(load)
        dt = time.perf_counter() - t0
        if any(ld.error for ld in loads):
            raise next(ld.error for ld in loads if ld.error)
    finally:
        backend.close()
        reader.close()
        arena.close()
    return size / dt, f"{reader.mode}/{backend.kind}"
