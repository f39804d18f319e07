"""Readers: aligned byte ranges of a weight file (or of a folder of shards) into caller-owned memory.

O_DIRECT is the default so the page cache neither hides the disk's real speed nor holds a second,
uncounted copy of the weights. Filesystems that refuse O_DIRECT (tmpfs) get buffered reads that drop
the pages they read with POSIX_FADV_DONTNEED, and the report says so. The backends that carry reads
out (threads, kernel AIO) are in io.py.
"""
from __future__ import annotations

import bisect
import errno
import mmap
import os

from ..errors import ReadError


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
