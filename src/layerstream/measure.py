"""Measurements shared by the CLI and the benchmarks: peak RSS, disk read speed, page-cache eviction."""
from __future__ import annotations

import os
import time
from collections import deque

from .runtime.arena import Arena
from .runtime.executor import Load
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
