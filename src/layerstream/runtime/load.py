"""One read in flight: what the executor issues and an I/O backend fills and signals (no logic)."""
from __future__ import annotations

import threading


class Load:
    """One read of a unit into arena bytes [addr, addr + nbytes); `off` is ring-relative (None if resident)."""

    __slots__ = ("uid", "off", "addr", "nbytes", "planned", "pending", "done", "error", "host_off", "copied")

    def __init__(self, uid: int, off: int | None, addr: int, nbytes: int, planned: bool = False):
        self.uid, self.off, self.addr, self.nbytes, self.planned = uid, off, addr, nbytes, planned
        self.host_off = off if off is not None else 0  # where a staged (CUDA) read lands in pinned memory
        self.copied = None  # CUDA: the event of its host-to-device copy
        self.pending = 0
        self.done = threading.Event()
        self.error: BaseException | None = None


def chunks_of(extents, base: int, step: int, data_end: int) -> list[tuple[int, int, int, int]]:
    """The reads of `extents` (file ranges -> slot offsets, from `base`) as I/O backend chunks of at most
    `step` bytes: (memory offset, file offset, bytes, bytes that must exist before `data_end`)."""
    out = []
    for ext in extents:
        for c in range(0, ext.nbytes, step):
            n = min(step, ext.nbytes - c)
            foff = ext.file_off + c
            out.append((base + ext.slot_off + c, foff, n, max(0, min(n, data_end - foff))))
    return out

