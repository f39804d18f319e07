"""The budgeted weight memory: one allocation, made once, that every weight view points into.

Sized by the plan (never above the budget) and allocated at start, so streaming never allocates and
can never fragment. Page-aligned (O_DIRECT writes straight into it) and untouched until read into, so
the process pays for pages only as they are filled. The arena also keeps its own accounting: bytes
held by live loads and the peak of that, which tests assert against the budget. Only the executor
changes it, on the compute thread, one call at a time, so it needs no lock.
"""
from __future__ import annotations

import mmap

import torch

from ..errors import BudgetError

PAGE = 4096
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux; elsewhere pages fault in as they are first read into


class Arena:
    def __init__(self, nbytes: int, budget: int, device: torch.device | str = "cpu"):
        if nbytes > budget:
            raise BudgetError(f"arena of {nbytes} bytes exceeds the budget of {budget} bytes")
        self.nbytes, self.budget = nbytes, budget
        self.live_bytes = 0
        self.peak_bytes = 0
        if torch.device(device).type == "cuda":  # read into pinned host memory first (see device.py)
            self._map, self.mem = None, None
            self.buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)[:nbytes]
            return
        # Its own anonymous mapping, not torch's allocator: page-aligned for O_DIRECT, and unmapped
        # when the last view dies. Through glibc, freeing one arena raises malloc's mmap threshold, so a
        # re-planned arena would come from the brk heap beside activations and never be given back.
        # Populated at once, so that no O_DIRECT read faults its pages in (and zeroes them) on the read's
        # path in the first calls of a plan, the ones learning times: every later call finds them mapped.
        self._map = mmap.mmap(-1, max(nbytes, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
        self.buf = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]
        self.mem = memoryview(self._map)[:nbytes]

    def view(self, off: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed tensor over arena bytes starting at `off` (no copy)."""
        n = dtype.itemsize
        for d in shape:
            n *= d
        return self.buf[off:off + n].view(dtype).view(shape)

    def hold(self, nbytes: int) -> None:
        """Account `nbytes` as live; the plan guarantees they fit, this checks it."""
        self.live_bytes += nbytes
        if self.live_bytes > self.nbytes:
            raise BudgetError(f"arena accounting: {self.live_bytes} live bytes exceed {self.nbytes}")
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drop(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def close(self) -> None:
        """Drop our references; the mapping goes when no view of it is left (never under a live view)."""
        if self.mem is not None:
            self.mem.release()
        self.buf = self.mem = self._map = None
