"""I/O backends: file bytes -> arena memory (or pinned staging memory on CUDA).

The readers (O_DIRECT by default, buffered where the filesystem refuses it) are in readers.py. Two
backends carry reads out behind one small interface (submit, wait, poll, close):
- `AioIO` (default with O_DIRECT): kernel AIO, submitted and reaped on the compute thread, no threads
  (see aio.py for why). Measured here: 1 MiB reads reach the disk's
  ceiling from 4 in flight on (one at a time reached half of it), and io_submit of a 1 MiB read
  returns in about 0.07 ms, while a 4 MiB one blocked the caller for 2.7 ms as the block layer split it.
  Depth stays at 4: the device completes reads in flight in any order, so with 32 in flight the unit
  needed first (the next call's stem) landed after 24 MiB of later ones, 42 ms late.
- `ThreadIO`: `os.preadv` (which releases the GIL) on a small thread pool; for buffered files and
  wherever kernel AIO is unavailable.

A backend made by `make_io` reads one Reader. A Session's backend (`make_shared_io`) reads for every
model: each model submits through its own `Port` (its Reader's fds, its trace), so all models' reads
share one queue in issue order, one AIO context or one pool, instead of competing across several.
"""
from __future__ import annotations

import itertools
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from ..errors import ReadError
from .aio import AioContext, iocb
from .readers import (BufferedReader, DirectReader, MultiReader, Reader,  # noqa: F401  (imported from here too)
                      open_reader)

CHUNK_BYTES = 4 * 2**20  # per read with threads: large enough for full bandwidth, few enough wake-ups
DEFAULT_WORKERS = 4


class IOBackend:
    """Moves chunks of a Load from the file into the arena; `load.done` is set when all have landed."""

    kind = "abstract"
    chunk_bytes = CHUNK_BYTES  # how the executor splits a unit's extents into reads
    inflight_bytes = 0  # the most a step's compute can find in flight (0: reads go on beside it, no limit)

    def __init__(self, reader: Reader | None, trace):
        self.reader, self.trace = reader, trace  # None for a shared backend: each Port brings its own
        self.pending = 0  # chunks submitted through the backend itself and not finished (see Port)

    def submit(self, load, arena, chunks: list[tuple[int, int, int, int]], src=None) -> None:
        """Queue `chunks` = [(arena offset, file offset, bytes, bytes that must exist)] of `load`,
        read from `src`'s Reader (a Port of a shared backend; by default the backend's own)."""
        src = src or self
        load.pending = len(chunks)
        if not chunks:
            load.done.set()
            return
        self._count(src, len(chunks))
        self._submit(load, arena, chunks, src)

    def port(self, reader: Reader, trace) -> Port:
        """One reader's door to this (shared) backend: closing it leaves the backend open."""
        return Port(self, reader, trace)

    def wait(self, load) -> None:
        """Block until every chunk of `load` has landed (or failed: see load.error)."""
        self._wait(load)

    def poll(self) -> None:
        """Give queued reads to the device if it has room (cheap; called at hook time)."""

    def progress(self) -> None:
        """Notice finished reads without waiting, so their loads' `done` is set (CUDA copies them early)."""

    def close(self) -> None:
        """Wait for every read in flight, then free the backend's resources."""

    def drain(self, src) -> None:
        """Wait until every chunk submitted from `src` has finished (its fds may then be closed)."""

    def _count(self, src, n: int) -> None:
        src.pending += n

    def _finish_chunk(self, load, error: BaseException | None, src) -> None:
        src.pending -= 1
        if error is not None and load.error is None:
            load.error = error
        load.pending -= 1
        if load.pending == 0:
            load.done.set()


class Port:
    """One model's reads through a backend it shares with others (a Session's): its own Reader and trace.

    It has the backend's interface, so an Executor cannot tell it from a backend of its own. Closing
    it waits for its own reads (its Reader's fds are about to close) and leaves the backend open.
    """

    def __init__(self, backend: IOBackend, reader: Reader, trace):
        self.backend, self.reader, self.trace = backend, reader, trace
        self.kind, self.chunk_bytes, self.inflight_bytes = backend.kind, backend.chunk_bytes, backend.inflight_bytes
        self.pending = 0  # chunks submitted through this port and not finished

    def submit(self, load, arena, chunks) -> None:
        self.backend.submit(load, arena, chunks, self)

    def wait(self, load) -> None:
        self.backend.wait(load)

    def poll(self) -> None:
        self.backend.poll()

    def progress(self) -> None:
        self.backend.progress()

    def close(self) -> None:
        if self.backend is not None:
            self.backend.drain(self)
            self.backend = None


class ThreadIO(IOBackend):
    kind = "threads"

    def __init__(self, reader: Reader, trace, workers: int = DEFAULT_WORKERS):
        super().__init__(reader, trace)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="layerstream-read")
        self._lock = threading.Condition()  # guards every source's and load's counts of chunks pending

    def _count(self, src, n: int) -> None:
        with self._lock:
            src.pending += n

    def _submit(self, load, arena, chunks, src) -> None:
        for off, file_off, nbytes, need in chunks:
            self.pool.submit(self._read, load, arena.mem[off:off + nbytes], file_off, need, src)

    def _read(self, load, dst: memoryview, file_off: int, need: int, src) -> None:
        t0, err = src.trace.now(), None
        try:
            if load.error is None:
                src.reader.read_into(dst, file_off, need)
        except BaseException as e:  # surfaced on the compute thread by the executor's wait
            err = e
        finally:
            dst.release()
            src.trace.add(f"read u{load.uid}", "read", t0, src.trace.now())
            with self._lock:
                self._finish_chunk(load, err, src)
                self._lock.notify_all()

    def _wait(self, load) -> None:
        load.done.wait()

    def drain(self, src) -> None:
        with self._lock:
            self._lock.wait_for(lambda: src.pending == 0)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


class AioIO(IOBackend):
    kind = "aio"
    chunk_bytes = 2**20  # submits without blocking the compute thread (see the module docstring)

    def __init__(self, reader: Reader | None, trace, depth: int = 4):
        super().__init__(reader, trace)
        self.ctx = AioContext(depth)
        self.inflight_bytes = depth * self.chunk_bytes  # submitted and reaped between steps only
        self.queued: deque = deque()  # chunks waiting for room in the kernel queue, in issue order
        self.inflight: dict[int, tuple] = {}  # iocb data -> (iocb, load, file_off, need, t_submit, src)
        self._ids = itertools.count()

    def _submit(self, load, arena, chunks, src) -> None:
        base = arena.buf.data_ptr()
        for off, file_off, nbytes, need in chunks:
            key = next(self._ids)
            fd, local_off, need = src.reader.route(file_off, need)  # a shard's fd for a sharded checkpoint
            self.queued.append((key, iocb(fd, base + off, nbytes, local_off, key), load, file_off, need, src))
        self.poll()

    def poll(self) -> None:
        if self.queued and self.inflight:
            self._reap(0)  # collect what finished, without waiting, to make room
        room = self.ctx.depth - len(self.inflight)
        if not self.queued or room <= 0:
            return
        batch = [self.queued[i] for i in range(min(room, len(self.queued)))]
        trace = batch[0][5].trace
        t0 = trace.now()
        try:
            n = self.ctx.submit([b[1] for b in batch])
            trace.add("io_submit", "submit", t0, trace.now(), "compute")
        except OSError as e:  # the first chunk's read failed: fail it; the rest stay queued for the next poll
            _, _, load, file_off, _, src = self.queued.popleft()
            self._finish_chunk(load, ReadError(f"{src.reader.path}: read at offset {file_off} failed: {e}"), src)
            return
        for _ in range(n):
            key, cb, load, file_off, need, src = self.queued.popleft()
            self.inflight[key] = (cb, load, file_off, need, t0, src)

    def progress(self) -> None:
        if self.inflight:
            self._reap(0)
        self.poll()

    def _reap(self, min_nr: int) -> None:
        for key, res in self.ctx.reap(min_nr):
            cb, load, file_off, need, t0, src = self.inflight.pop(key)
            src.trace.add(f"read u{load.uid}", "read", t0, src.trace.now(), "disk (aio: submit to reap)")
            err = None
            if res < 0:
                err = ReadError(f"{src.reader.path}: read at offset {file_off} failed: {os.strerror(-res)}")
            elif res < need:
                err = ReadError(f"{src.reader.path}: read at offset {file_off} returned {res} of {need} bytes; "
                                "the file was truncated or replaced while streaming")
            self._finish_chunk(load, err, src)

    def _wait(self, load) -> None:
        while not load.done.is_set():
            self.poll()
            if not self.inflight:
                raise RuntimeError(f"load of unit {load.uid} has chunks neither queued nor in flight")
            self._reap(1)
        self.poll()

    def drain(self, src) -> None:
        while src.pending:  # its chunks queued behind other ports' go in their turn
            self.poll()
            if not self.inflight:
                raise RuntimeError(f"{src.reader.path}: {src.pending} chunks neither queued nor in flight")
            self._reap(1)

    def close(self) -> None:
        self.queued.clear()  # never submitted: nothing will write into the arena for them
        while self.inflight:
            self._reap(1)
        self.ctx.close()


def make_io(reader: Reader, trace, kind: str = "auto", workers: int = DEFAULT_WORKERS) -> IOBackend:
    """Kernel AIO for O_DIRECT files where the kernel allows it, else a thread pool."""
    return _backend(reader, trace, kind, workers, reader.mode)


def make_shared_io(mode: str, kind: str = "auto", workers: int = DEFAULT_WORKERS) -> IOBackend:
    """A backend with no reader of its own, for `Port`s: chosen as make_io would for files read in `mode`."""
    return _backend(None, None, kind, workers, mode)


def _backend(reader, trace, kind: str, workers: int, mode: str) -> IOBackend:
    if kind not in ("auto", "aio", "threads"):
        raise ValueError(f"io backend {kind!r}: use 'auto', 'aio' or 'threads'")
    if kind != "threads" and mode == "direct":
        try:
            return AioIO(reader, trace)
        except OSError:
            if kind == "aio":
                raise
    elif kind == "aio":
        raise ValueError("kernel AIO is only asynchronous with O_DIRECT; this file is read buffered")
    return ThreadIO(reader, trace, workers)
