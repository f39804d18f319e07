"""The ring's bytes, as the executor sees them: which are taken, where a demand miss can land, and
giving back the bytes of prefetches that will not be used (a mixin of Executor; compute thread only)."""
from __future__ import annotations

from ..budget import fmt_bytes
from ..errors import BudgetError
from .load import Load


class RingSpace:
    """Executor state it reads: live, inflight, bound, active, sizes, plan, io, arena, units, stats, others."""

    def _overlaps(self, off: int, nbytes: int) -> bool:
        end = off + nbytes
        return (any(ld.off < end and off < ld.off + ld.nbytes for ld in self.live)
                or any(ld.off < end and off < ld.off + ld.nbytes for ld in self.others()))

    def _demand(self, uid: int) -> Load:
        """Read `uid` now into a free gap of the ring, dropping the furthest prefetches if needed."""
        self.stats.demand_misses += 1
        need = self.sizes[uid]
        while (off := self._free_gap(need)) is None:
            idle = [ld for u, ld in self.bound.items() if not any(self.active.get(r) for r in self.units[u].roots)]
            if idle:  # bound, but none of its roots is running: its window outlived its use (an odd order)
                self._release(self.bound.pop(idle[0].uid))
                continue
            if self.on_ring_full is not None and self.on_ring_full():
                continue  # the next model's prefetches gave the ring back (before this call's own)
            if not self.inflight:
                held = ", ".join(f"{self.units[ld.uid].name} ({fmt_bytes(ld.nbytes)})" for ld in self.live)
                raise BudgetError(
                    f"unit {uid} ({self.units[uid].name}, {fmt_bytes(need)}) does not fit the "
                    f"{fmt_bytes(self.plan.ring_bytes)} ring beside the units in use at the same time: {held}; "
                    "raise the budget or lower max_unit")
            self._drop_from(max(self.inflight))
        load = Load(uid, off, self.plan.ring_offset + off, need)
        self._submit(load)
        return load

    def _free_gap(self, nbytes: int) -> int | None:
        pos = 0
        for ld in sorted([*self.live, *self.others()], key=lambda x: x.off):
            if ld.off - pos >= nbytes:
                return pos
            pos = max(pos, ld.off + ld.nbytes)
        return pos if self.plan.ring_bytes - pos >= nbytes else None

    def _drop_range(self, lo: int, hi: int) -> None:
        for k in [k for k in self.inflight if lo <= k < hi]:
            self._drop(self.inflight.pop(k))

    def _drop_from(self, lo: int) -> None:
        self._drop_range(lo, max(self.inflight, default=lo) + 1)
        self.issue_idx = min(self.issue_idx, lo)

    def _drop(self, load: Load) -> None:
        self.io.wait(load)  # its reads still write into the ring: the bytes are free only once they finish
        self._forget(load)

    def _forget(self, load: Load) -> None:
        if load in self.live:
            self.live.remove(load)
        self.arena.drop(load.nbytes)

