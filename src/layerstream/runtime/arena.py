"""The budgeted weight memory: one allocation, made once, that every weight view points into.

Sized by the plan (never above the budget) and allocated at start, so streaming never allocates and
can never fragment. Page-aligned (O_DIRECT writes straight into it) and untouched until read into, so
the process pays for pages only as they are filled. The arena also keeps its own accounting: bytes
held by live loads and the peak of that, which tests assert against the budget.
"""
from __future__ import annotations

import threading

import torch

from ..errors import BudgetError

PAGE = 4096


class Arena:
    def __init__(self, nbytes: int, budget: int):
        if nbytes > budget:
            raise BudgetError(f"arena of {nbytes} bytes exceeds the budget of {budget} bytes")
        self.nbytes, self.budget = nbytes, budget
        # Over-allocate one page and start at the first page boundary: torch aligns only to 64 bytes.
        self._raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
        start = (-self._raw.data_ptr()) % PAGE
        self.buf = self._raw[start:start + nbytes]
        self.mem = memoryview(self.buf.numpy()) if nbytes else memoryview(bytearray())
        self._lock = threading.Lock()
        self.live_bytes = 0
        self.peak_bytes = 0

    def view(self, off: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A typed tensor over arena bytes starting at `off` (no copy)."""
        n = dtype.itemsize
        for d in shape:
            n *= d
        return self.buf[off:off + n].view(dtype).view(shape)

    def hold(self, nbytes: int) -> None:
        """Account `nbytes` as live; the plan guarantees they fit, this checks it."""
        with self._lock:
            self.live_bytes += nbytes
            if self.live_bytes > self.nbytes:
                raise BudgetError(f"arena accounting: {self.live_bytes} live bytes exceed {self.nbytes}")
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    def drop(self, nbytes: int) -> None:
        with self._lock:
            self.live_bytes -= nbytes

    def close(self) -> None:
        self.mem.release()
        self.buf = self._raw = None
