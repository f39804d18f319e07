"""Readers and I/O backends: file bytes -> arena memory (or pinned staging memory on CUDA).

O_DIRECT is the default so the page cache neither hides the disk's real speed nor holds a second,
uncounted copy of the weights. Filesystems that refuse O_DIRECT (tmpfs) get buffered reads that drop
the pages they read with POSIX_FADV_DONTNEED, and the report says so.

Two backends carry reads out behind one small interface (submit, wait, poll, close):
- `AioIO` (default with O_DIRECT): kernel AIO, submitted and reaped on the compute thread, no threads
  (see aio.py for why). Measured here: 1 MiB reads reach the disk's
  ceiling from 4 in flight on (one at a time reached half of it), and io_submit of a 1 MiB read
  returns in about 0.07 ms, while a 4 MiB one blocked the caller for 2.7 ms as the block layer split it.
  Depth stays at 4: the device completes reads in flight in any order, so with 32 in flight the unit
  needed first (the next call's stem) landed after 24 MiB of later ones, 42 ms late.
- `ThreadIO`: `os.preadv` (which releases the GIL) on a small thread pool; for buffered files and
  wherever kernel AIO is unavailable.
"""
from __future__ import annotations

import bisect
import errno
import itertools
import mmap
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import ReadError
from .aio import AioContext, iocb

CHUNK_BYTES = 4 * 2**20  # per read with threads: large enough for full bandwidth, few enough wake-ups
DEFAULT_WORKERS = 4


class Reader:
    """Reads aligned byte ranges of one file into caller-owned memory. Subclasses fill in `_read`."""

    mode = "abstract"

    def __init__(self, path: str, fd: int):
        self.path, self.fd = path, fd
        self.size = os.fstat(fd).st_size

    def read_into(self, dst: memoryview, file_off: int, need: int) -> None:
        """Fill `dst` from `file_off`; at least `need` bytes must exist (the rest may lie past EOF)."""
        try:
            got = self._read(dst, file_off)
        except OSError as e:
            raise ReadError(f"{self.path}: read of {len(dst)} bytes at offset {file_off} failed: {e}") from e
        if got < need:
            raise ReadError(f"{self.path}: read at offset {file_off} returned {got} of {need} bytes; "
                            "the file was truncated or replaced while streaming")

    def _read(self, dst: memoryview, file_off: int) -> int:
        raise NotImplementedError

    def route(self, file_off: int, need: int) -> tuple[int, int, int]:
        """(fd, offset in that file, bytes that must exist there) of a read at `file_off` (AIO submits by fd)."""
        return self.fd, file_off, need

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class DirectReader(Reader):
    mode = "direct"

    def _read(self, dst: memoryview, file_off: int) -> int:
        return os.preadv(self.fd, [dst], file_off)


class BufferedReader(Reader):
    mode = "buffered"

    def _read(self, dst: memoryview, file_off: int) -> int:
        got = os.preadv(self.fd, [dst], file_off)
        # Drop what we just read so the page cache does not keep a second copy of the weights.
        os.posix_fadvise(self.fd, file_off, len(dst), os.POSIX_FADV_DONTNEED)
        return got


class MultiReader(Reader):
    """Several files read as one virtual file (a sharded checkpoint: see checkpoint.py).

    Each shard sits at its own aligned base, with a gap wider than any coalesced read between shards,
    so a read starts inside exactly one shard and is handed to that shard's reader. A read may run past
    its shard's end into the gap (aligned reads of the shard's last tensor): only the bytes up to the
    shard's end must exist, as with a single file's end.
    """

    def __init__(self, path: str, parts: list[tuple[int, Reader]]):
        self.path, self.fd = path, -1
        self.parts = parts
        self.bases = [b for b, _ in parts]
        self.size = parts[-1][0] + parts[-1][1].size
        self.mode = parts[0][1].mode

    def _part(self, file_off: int) -> tuple[int, Reader]:
        i = bisect.bisect_right(self.bases, file_off) - 1
        if i < 0 or file_off >= self.parts[i][0] + self.parts[i][1].size:
            raise ReadError(f"{self.path}: offset {file_off} lies between shards; no tensor is there")
        return self.parts[i]

    def route(self, file_off: int, need: int) -> tuple[int, int, int]:
        base, r = self._part(file_off)
        return r.fd, file_off - base, min(need, r.size - (file_off - base))

    def read_into(self, dst: memoryview, file_off: int, need: int) -> None:
        base, r = self._part(file_off)
        r.read_into(dst, file_off - base, min(need, r.size - (file_off - base)))

    def close(self) -> None:
        for _, r in self.parts:
            r.close()


def open_reader(path: str, mode: str = "auto", parts: tuple[tuple[int, str], ...] = ()) -> Reader:
    """Open `path` for streaming: mode "direct", "buffered", or "auto" (direct, else buffered).

    With `parts` ((base offset, file) per shard, from checkpoint.read_checkpoint), open every shard in
    one mode and route reads by offset (MultiReader).
    """
    if mode not in ("auto", "direct", "buffered"):
        raise ValueError(f"reader mode {mode!r}: use 'auto', 'direct' or 'buffered'")
    if parts:
        return _open_parts(path, mode, parts)
    if mode in ("auto", "direct"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            if mode == "direct" or e.errno != errno.EINVAL:
                raise ReadError(f"{path}: cannot open with O_DIRECT: {e}") from e
        else:
            if _direct_works(fd):
                return DirectReader(path, fd)
            os.close(fd)
            if mode == "direct":
                raise ReadError(f"{path}: the filesystem refuses O_DIRECT reads; use reader='buffered'")
    try:
        return BufferedReader(path, os.open(path, os.O_RDONLY))
    except OSError as e:
        raise ReadError(f"{path}: cannot open: {e}") from e


def _open_parts(path: str, mode: str, parts: tuple[tuple[int, str], ...]) -> MultiReader:
    readers: list[Reader] = []
    try:
        for _, p in parts:
            readers.append(open_reader(p, mode))
        if len({r.mode for r in readers}) > 1:  # shards on filesystems that differ: read all alike
            for r in readers:
                r.close()
            readers = []
            for _, p in parts:
                readers.append(open_reader(p, "buffered"))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return MultiReader(path, [(b, r) for (b, _), r in zip(parts, readers)])


def _direct_works(fd: int) -> bool:
    """Some filesystems accept O_DIRECT at open and refuse it at read: try one aligned read."""
    buf = mmap.mmap(-1, 4096)
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        buf.close()


class IOBackend:
    """Moves chunks of a Load from the file into the arena; `load.done` is set when all have landed."""

    kind = "abstract"
    chunk_bytes = CHUNK_BYTES  # how the executor splits a unit's extents into reads

    def __init__(self, reader: Reader, trace):
        self.reader, self.trace = reader, trace

    def submit(self, load, arena, chunks: list[tuple[int, int, int, int]]) -> None:
        """Queue `chunks` = [(arena offset, file offset, bytes, bytes that must exist)] of `load`."""
        load.pending = len(chunks)
        if not chunks:
            load.done.set()
            return
        self._submit(load, arena, chunks)

    def wait(self, load) -> None:
        """Block until every chunk of `load` has landed (or failed: see load.error)."""
        self._wait(load)

    def poll(self) -> None:
        """Give queued reads to the device if it has room (cheap; called at hook time)."""

    def progress(self) -> None:
        """Notice finished reads without waiting, so their loads' `done` is set (CUDA copies them early)."""

    def close(self) -> None:
        """Wait for every read in flight, then free the backend's resources."""

    def _finish_chunk(self, load, error: BaseException | None) -> None:
        if error is not None and load.error is None:
            load.error = error
        load.pending -= 1
        if load.pending == 0:
            load.done.set()


class ThreadIO(IOBackend):
    kind = "threads"

    def __init__(self, reader: Reader, trace, workers: int = DEFAULT_WORKERS):
        super().__init__(reader, trace)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerstream-read")
        self._lock = threading.Lock()

    def _submit(self, load, arena, chunks) -> None:
        for off, file_off, nbytes, need in chunks:
            self.pool.submit(self._read, load, arena.mem[off:off + nbytes], file_off, need)

    def _read(self, load, dst: memoryview, file_off: int, need: int) -> None:
        t0, err = self.trace.now(), None
        try:
            if load.error is None:
                self.reader.read_into(dst, file_off, need)
        except BaseException as e:  # surfaced on the compute thread by the executor's wait
            err = e
        finally:
            dst.release()
            self.trace.add(f"read u{load.uid}", "read", t0, self.trace.now())
            with self._lock:
                self._finish_chunk(load, err)

    def _wait(self, load) -> None:
        load.done.wait()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class AioIO(IOBackend):
    kind = "aio"
    chunk_bytes = 2**20  # submits without blocking the compute thread (see the module docstring)

    def __init__(self, reader: Reader, trace, depth: int = 4):
        super().__init__(reader, trace)
        self.ctx = AioContext(depth)
        self.queued: deque = deque()  # chunks waiting for room in the kernel queue
        self.inflight: dict[int, tuple] = {}  # iocb data -> (iocb, load, file_off, need, t_submit)
        self._ids = itertools.count()

    def _submit(self, load, arena, chunks) -> None:
        base = arena.buf.data_ptr()
        for off, file_off, nbytes, need in chunks:
            key = next(self._ids)
            fd, local_off, need = self.reader.route(file_off, need)  # a shard's fd for a sharded checkpoint
            self.queued.append((key, iocb(fd, base + off, nbytes, local_off, key), load, file_off, need))
        self.poll()

    def poll(self) -> None:
        if self.queued and self.inflight:
            self._reap(0)  # collect what finished, without waiting, to make room
        room = self.ctx.depth - len(self.inflight)
        if not self.queued or room <= 0:
            return
        batch = [self.queued[i] for i in range(min(room, len(self.queued)))]
        t0 = self.trace.now()
        try:
            n = self.ctx.submit([b[1] for b in batch])
            self.trace.add("io_submit", "submit", t0, self.trace.now(), "compute")
        except OSError as e:  # fail the first chunk; the rest stay queued for the next poll
            _, _, load, file_off, _ = self.queued.popleft()
            self._finish_chunk(load, ReadError(f"{self.reader.path}: read at offset {file_off} failed: {e}"))
            return
        for _ in range(n):
            key, cb, load, file_off, need = self.queued.popleft()
            self.inflight[key] = (cb, load, file_off, need, t0)

    def progress(self) -> None:
        if self.inflight:
            self._reap(0)
        self.poll()

    def _reap(self, min_nr: int) -> None:
        for key, res in self.ctx.reap(min_nr):
            cb, load, file_off, need, t0 = self.inflight.pop(key)
            self.trace.add(f"read u{load.uid}", "read", t0, self.trace.now(), "disk (aio: submit to reap)")
            err = None
            if res < 0:
                err = ReadError(f"{self.reader.path}: read at offset {file_off} failed: {os.strerror(-res)}")
            elif res < need:
                err = ReadError(f"{self.reader.path}: read at offset {file_off} returned {res} of {need} bytes; "
                                "the file was truncated or replaced while streaming")
            self._finish_chunk(load, err)

    def _wait(self, load) -> None:
        while not load.done.is_set():
            self.poll()
            if not self.inflight:
                raise RuntimeError(f"load of unit {load.uid} has chunks neither queued nor in flight")
            self._reap(1)
        self.poll()

    def close(self) -> None:
        self.queued.clear()  # never submitted: nothing will write into the arena for them
        while self.inflight:
            self._reap(1)
        self.ctx.close()


def make_io(reader: Reader, trace, kind: str = "auto", workers: int = DEFAULT_WORKERS) -> IOBackend:
    """Kernel AIO for O_DIRECT files where the kernel allows it, else a thread pool."""
    if kind not in ("auto", "aio", "threads"):
        raise ValueError(f"io backend {kind!r}: use 'auto', 'aio' or 'threads'")
    if kind != "threads" and reader.mode == "direct":
        try:
            return AioIO(reader, trace)
        except OSError:
            if kind == "aio":
                raise
    elif kind == "aio":
        raise ValueError("kernel AIO is only asynchronous with O_DIRECT; this file is read buffered")
    return ThreadIO(reader, trace, workers)
