"""Measurements shared by the CLI and the benchmarks: peak RSS, disk read speed, page-cache eviction."""
from __future__ import annotations

import mmap
import os
import time

from .runtime.io import CHUNK_BYTES, DEFAULT_WORKERS, open_reader, read_pool


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


def disk_read_bps(path: str | os.PathLike, mode: str = "auto", workers: int = DEFAULT_WORKERS,
                  max_bytes: int = 2 * 2**30) -> tuple[float, str]:
    """Read speed of `path` with the streaming reader (same mode, chunking and threads), in bytes/s.

    Reads up to `max_bytes` of the file through a small reused buffer, so it costs no memory, and
    evicts the file's pages first so a buffered reader is measured against the disk, not the cache.
    """
    path = os.fspath(path)
    evict_page_cache(path)
    reader = open_reader(path, mode)
    size = min(reader.size - reader.size % 4096, max_bytes)
    slots = 2 * workers
    buf = mmap.mmap(-1, slots * CHUNK_BYTES)
    mem = memoryview(buf)
    try:
        with read_pool(workers) as pool:
            t0 = time.perf_counter()
            futs = []
            for i, off in enumerate(range(0, size, CHUNK_BYTES)):
                n = min(CHUNK_BYTES, size - off)
                slot = (i % slots) * CHUNK_BYTES
                if len(futs) >= slots:
                    futs.pop(0).result()  # the slot is reused: wait for the read that last used it
                futs.append(pool.submit(reader.read_into, mem[slot:slot + n], off, n))
            for f in futs:
                f.result()
            dt = time.perf_counter() - t0
    finally:
        reader.close()
        mem.release()
        buf.close()
    return size / dt, reader.mode
