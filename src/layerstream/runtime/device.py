"""Streaming to a CUDA device: read into pinned host memory, copy on a stream of its own, sync by events.

Read -> copy -> compute, as Demand Layering's three-stage pipeline:
- reads land in a pinned host ring that mirrors the device ring's offsets (O_DIRECT needs host memory,
  and pinned memory lets the copy engine run asynchronously);
- each finished read is copied host-to-device on `copy_stream`, and an event marks the copy done;
- compute does not wait on the CPU: the compute stream waits on the copy's event;
- a ring region is only overwritten after the compute that used its previous occupant has finished:
  releasing a unit records an event on the compute stream, and the next copy into those bytes waits on
  it, on the GPU.
The device arena is the budget (checked with torch.cuda.max_memory_allocated); the pinned host ring is
the size of the device ring, plus room for the largest resident unit at start.
"""
from __future__ import annotations

import torch

from .arena import PAGE


class PinnedHost:
    """Page-aligned pinned host memory, with the `.buf` / `.mem` the I/O backends write into."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self._raw = torch.empty(nbytes + PAGE, dtype=torch.uint8, pin_memory=True)
        start = (-self._raw.data_ptr()) % PAGE
        self.buf = self._raw[start:start + nbytes]
        self.mem = memoryview(self.buf.numpy())

    def close(self) -> None:
        self.mem.release()
        self.buf = self._raw = self.mem = None


class CudaStage:
    def __init__(self, device: torch.device, host_bytes: int):
        self.device = device
        self.host = PinnedHost(host_bytes)
        self.copy_stream = torch.cuda.Stream(device)
        self._freed: list[tuple[int, int, torch.cuda.Event]] = []  # device ring regions: compute done event
        self._copies: list[tuple[int, int, torch.cuda.Event]] = []  # host ring regions: copy out done event

    def before_read(self, host_off: int, nbytes: int) -> None:
        """Host bytes are rewritten only after the copy that last read them has finished (rarely waits)."""
        keep = []
        for a, b, ev in self._copies:
            if a < host_off + nbytes and host_off < b:
                ev.synchronize()
            else:
                keep.append((a, b, ev))
        self._copies = keep

    def copy(self, load, arena, host_off: int) -> None:
        """Queue the host-to-device copy of a finished read, after compute has left its device bytes."""
        lo, hi = load.addr, load.addr + load.nbytes
        with torch.cuda.stream(self.copy_stream):
            keep = []
            for a, b, ev in self._freed:
                if a < hi and lo < b:
                    self.copy_stream.wait_event(ev)
                else:
                    keep.append((a, b, ev))
            self._freed = keep
            arena.buf[lo:hi].copy_(self.host.buf[host_off:host_off + load.nbytes], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        load.copied = ev
        self._copies.append((host_off, host_off + load.nbytes, ev))

    def ready(self, load) -> None:
        """Compute (the current stream) waits for the load's copy, on the GPU."""
        torch.cuda.current_stream(self.device).wait_event(load.copied)

    def released(self, load) -> None:
        """Mark the load's device bytes free once the compute queued so far has run."""
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._freed.append((load.addr, load.addr + load.nbytes, ev))

    def close(self) -> None:
        self.copy_stream.synchronize()
        self.host.close()
