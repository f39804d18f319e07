"""Carries a Plan out: hooks on unit roots bind weights as views into the arena, reads run ahead.

All scheduling happens on the compute thread, at hook time: ring bytes are only ever freed when a unit
is released (a forward hook), so that is the only moment a blocked read can become issuable, and
issuing there needs no scheduler thread and no lock around the plan. Reader threads only fill memory
and signal completion.

A planned load k lands at its fixed ring offset and is issued, in plan order, as soon as no live load
overlaps its bytes. When compute needs a unit that is not the next planned load (data-dependent
control flow, a first call whose order differs from the guess) it skips ahead within the call if the
unit is planned later, or else reads it synchronously into a free gap of the ring (a *demand miss*),
dropping the furthest-ahead prefetches if it must. Correctness never depends on the plan.

In a Session several executors share one ring, one call at a time (`call_only`): an executor never reads
past its own call, sees the other models' loads as taken ring bytes (`others`), and lets the session
fill the ring with the next model's first loads (`prefetch`) or take them back (`drop_prefetched`).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..capture import ST_TO_TORCH, Captured
from ..errors import ChecksumError, ReadError
from ..plan import Plan
from ..units import UnitLayout
from .arena import Arena
from .dequant import expand
from .io import IOBackend
from .load import Load, chunks_of
from .ring import RingSpace
from .lookup import check_resident_splits
from .trace import Trace
from .verify import verify


class Stats:
    def __init__(self):
        self.stall_ns = 0
        self.demand_misses = 0
        self.bytes_read = 0


class Executor(RingSpace):
    def __init__(self, cap: Captured, layouts: dict[int, UnitLayout], plan: Plan, arena: Arena,
                 io: IOBackend, trace: Trace, stage=None, checks: dict | None = None,
                 split_digests: dict[str, str] | None = None):
        self.cap, self.layouts, self.plan, self.arena = cap, layouts, plan, arena
        self.checks = checks or {}  # unit id -> packfile.Check's to verify once its read has landed
        self.split_digests = split_digests or {}  # tensor cut into blocks -> its digest (lookup.py checks)
        self.split_verified: set[str] = set()  # split tensors all of whose blocks are resident and verified
        self.io, self.trace = io, trace
        self.stage = stage  # CudaStage on a CUDA device: reads land in pinned memory, then get copied
        self.units = cap.program.units
        self.sizes = {u: lay.slot_nbytes for u, lay in layouts.items()}
        plan.validate(self.sizes)
        self.closer = {u.uid: u.roots[-1] for u in self.units}
        self.loads = plan.loads
        self.n = len(plan.loads)
        self.resident = plan.resident_ids
        self.resident_addr = dict(plan.resident)
        self.refs = {t.name: t for t in cap.program.tensors} | cap.virtual  # + row blocks (block units)
        self.stats = Stats()
        self.issue_idx = self.consume_idx = 0
        self.serial = False  # profiling: issue each load only when compute asks, so none overlaps compute
        # Session: the ring is shared, so read only this call's loads; the session prefetches the next model.
        self.call_only = False
        self.call_end = self.n  # planned index past this call's last load
        self.others: Callable[[], Iterable[Load]] = tuple  # other models' loads in the shared ring
        self.on_ring_full: Callable[[], bool] | None = None  # frees others' prefetches; True if it freed any
        self.after_release: Callable[[], None] | None = None  # after a release (the session's tail prefetch)
        self.inflight: dict[int, Load] = {}  # planned index -> issued load not yet consumed
        self.live: list[Load] = []  # loads holding ring bytes
        self.bound: dict[int, Load] = {}  # unit id -> ring load bound to its tensors
        self.active: dict[str, int] = {}  # root path -> how many of its forwards are running
        self.recorded: list[tuple[str, int, int]] = []  # (root path, hook start, weights ready) this call
        # (unit id, acquire start, weights ready) of each block unit a forward acquired this call: its
        # read is waited for inside the forward, so the root's hooks alone would time it as compute
        self.unit_waits: list[tuple[int, int, int]] = []
        self.t_call = (0, 0)  # this call's start and end, ns
        self.t_open: dict[str, int] = {}
        self.holders: dict[str, torch.Tensor] = {}
        self.bound_by: dict[str, Load] = {}  # tensor name -> the ring load its holder points into
        self.resident_views: dict[str, torch.Tensor] = {}
        self._load_resident()
        # Every planned placement's views, made once here: placements repeat every call, so binding a
        # unit is then only a .data swap per tensor (a view per tensor per call otherwise).
        self._views = {(u, plan.ring_offset + off): self._make_views(u, plan.ring_offset + off) for u, off in plan.loads}
        for t in cap.program.tensors:
            if t.name not in self.holders:
                self._holder(t.name, self.cap.originals[t.name])

    # ---- hooks (compute thread) -------------------------------------------------------------
    def pre(self, path: str) -> None:
        t0 = Trace.now()
        self.active[path] = self.active.get(path, 0) + 1
        if self.stage is not None:
            self._copy_finished()
        else:  # refill the device's queue: kernel AIO is submitted and reaped on this thread, between steps
            self.io.progress()  # (once per root, as it starts: the last root's end is followed by this)
        for uid in self.cap.root_units[path]:
            if uid not in self.resident and uid not in self.bound and self.units[uid].mode != "block":
                self._acquire(uid)  # (a block is acquired by lookup.py when its rows are computed)
        t1 = self.t_open[path] = Trace.now()
        self.recorded.append((path, t0, t1))

    def post(self, path: str) -> None:
        t1 = Trace.now()
        self.trace.add(path or "<top>", "compute", self.t_open.pop(path, t1), t1, "compute")
        self.active[path] -= 1
        self.release([uid for uid in self.cap.root_units[path] if self.closer[uid] == path])

    # ---- units computed by lookup.py (gather, block) ----------------------------------------------
    def acquire(self, uid: int) -> int:
        """Make unit `uid`'s slot hold its bytes (read or reserved); its arena address."""
        block = self.units[uid].mode == "block"
        t0 = Trace.now() if block else 0
        if uid in self.resident:
            addr = self.resident_addr[uid]
        else:
            if uid not in self.bound:
                self._acquire(uid)
            addr = self.bound[uid].addr
        if block:
            self.unit_waits.append((uid, t0, Trace.now()))
        return addr

    def release(self, uids) -> None:
        """Release the bound units among `uids`, then issue the reads their bytes were waiting for."""
        released = False
        for uid in uids:
            if uid in self.bound:
                self._release(self.bound.pop(uid))
                released = True
        if released:
            self._pump()
            if self.after_release is not None:
                self.after_release()

    def views(self, uid: int) -> list[torch.Tensor]:
        """The tensors of acquired unit `uid`, in the unit's order (a block's rows: weight, bias)."""
        names = self.units[uid].tensors
        if uid in self.resident:
            return [self.resident_views[n] for n in names]
        load = self.bound[uid]
        views = dict(self._views.get((uid, load.addr)) or self._make_views(uid, load.addr))
        return [views[n] for n in names]

    def read_now(self, load: Load, chunks) -> None:
        """Read `chunks` into `load`'s bytes (already held) and wait: the rows a lookup needs."""
        self.stats.bytes_read += sum(c[2] for c in chunks)
        self.io.submit(load, self.arena, chunks)
        self._wait(load)

    def begin_call(self) -> None:
        self.t_call = (Trace.now(), 0)
        self.recorded = []
        self.unit_waits = []
        self.active.clear()
        self._align()
        self._pump()

    def _align(self) -> None:
        if self.n and self.consume_idx % self.n:  # last call ended mid-cycle: realign to a call start
            self._drop_from(self.consume_idx)
            self.consume_idx = self.issue_idx = -(-self.consume_idx // self.n) * self.n
        self.call_end = self.consume_idx + self.n

    def end_call(self) -> None:
        self.t_call = (self.t_call[0], Trace.now())
        for load in list(self.bound.values()):
            self._release(load)
        self.bound.clear()
        if not self.call_only:
            self._pump()  # the next call's first loads read during the gap between calls

    # ---- a shared ring (Session) --------------------------------------------------------------
    def prefetch(self) -> None:
        """Issue the next call's first loads into ring bytes that no load (of any model) holds."""
        self._align()
        self._pump()

    @property
    def issued_all(self) -> bool:
        """Every load of this call is issued: ring bytes it does not hold now it will not need again."""
        return self.issue_idx >= self.call_end

    def drop_prefetched(self) -> int:
        """Give back the ring bytes of every issued, unconsumed load (after its reads land); how many."""
        n = len(self.inflight)
        for k in sorted(self.inflight):
            self._drop(self.inflight.pop(k))
        self.issue_idx = self.consume_idx
        return n

    # ---- acquiring and releasing --------------------------------------------------------------
    def _acquire(self, uid: int) -> None:
        k = self.consume_idx
        if not (self.n and self.loads[k % self.n][0] == uid):
            end = (k // self.n + 1) * self.n if self.n else k
            k = next((i for i in range(k, end) if self.loads[i % self.n][0] == uid), None)
            if k is not None:  # planned later in this call: skip the loads in between
                self._drop_range(self.consume_idx, k)
        load = None
        if k is not None:
            if self.serial and k not in self.inflight and not self._overlaps(*self._place(k)):
                self._issue(k)
            load = self.inflight.pop(k, None)
            self.consume_idx = k + 1
            self.issue_idx = max(self.issue_idx, self.consume_idx)
        if load is None:
            load = self._demand(uid)
        try:
            self._wait(load)
        except BaseException:
            self._forget(load)  # its bytes hold nothing usable: give them back so the next call can run
            raise
        self._bind(load)
        self.bound[uid] = load

    def _release(self, load: Load) -> None:
        if self.stage is not None:
            self.stage.released(load)
        for name, _ in self.layouts[load.uid].tensor_offsets:
            if self.bound_by.get(name) is not load:
                continue  # resident, or re-bound since by another unit that shares it (tied weights)
            del self.bound_by[name]
            for o in self.cap.owners[name]:
                o.assign(self.cap.originals[name])
        self.live.remove(load)
        self.arena.drop(load.nbytes)

    def _make_views(self, uid: int, addr: int) -> list[tuple[str, torch.Tensor]]:
        return [(name, self._view(name, addr + off)) for name, off in self.layouts[uid].tensor_offsets
                if name not in self.resident_views]

    def _bind(self, load: Load) -> None:
        if self.units[load.uid].mode:
            return  # a gather or block unit: lookup.py takes its bytes, no module holds them
        views = self._views.get((load.uid, load.addr)) if load.planned else None
        for name, view in views if views is not None else self._make_views(load.uid, load.addr):
            self._set(name, view)
            self.bound_by[name] = load

    def _holder(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The one object per tensor that the model's modules hold while it is bound; .data moves."""
        holder = self.holders.get(name)
        if holder is None:
            # A new tensor object either way: assigning .data later must not retarget a cached view.
            t = torch.empty(0, dtype=like.dtype)
            holder = nn.Parameter(t, requires_grad=False) if self.cap.owners[name][0].is_param else t
            self.holders[name] = holder
        return holder

    def _set(self, name: str, view: torch.Tensor) -> None:
        holder = self._holder(name, view)
        holder.data = view
        for o in self.cap.owners[name]:
            o.assign(holder)

    def _view(self, name: str, addr: int) -> torch.Tensor:
        ref = self.refs[name]
        return self.arena.view(addr, ST_TO_TORCH[ref.dtype], ref.shape)

    # ---- issuing reads --------------------------------------------------------------------------
    def _pump(self) -> None:
        """Issue planned loads in order while their ring bytes are free, up to one call ahead."""
        end = self.call_end if self.call_only else self.consume_idx + self.n
        while not self.serial and self.n and self.issue_idx < end:
            if self._overlaps(*self._place(self.issue_idx)):
                return
            self._issue(self.issue_idx)
            self.issue_idx += 1

    def _place(self, idx: int) -> tuple[int, int]:
        """(ring offset, bytes) of planned load `idx`."""
        uid, off = self.loads[idx % self.n]
        return off, self.sizes[uid]

    def _issue(self, idx: int) -> None:
        uid, off = self.loads[idx % self.n]
        load = Load(uid, off, self.plan.ring_offset + off, self.sizes[uid], planned=True)
        self.inflight[idx] = load
        self._submit(load)

    def set_serial(self, serial: bool) -> None:
        if serial:  # the next call's first loads were issued when this one ended: a serial call reads none ahead
            self.drop_prefetched()
        self.serial = serial
        self.issue_idx = max(self.issue_idx, self.consume_idx)

    def _submit(self, load: Load) -> None:
        """Split the unit's extents into chunks and hand them to the I/O backend."""
        lay = self.layouts[load.uid]
        target, base = self.arena, load.addr
        if self.stage is not None:
            target, base = self.stage.host, load.host_off
            self.stage.before_read(base, load.nbytes)
        chunks = chunks_of(lay.extents, base, self.io.chunk_bytes, lay.data_end)
        if load.off is not None:
            self.live.append(load)
        self.arena.hold(load.nbytes)
        self.stats.bytes_read += lay.read_nbytes  # what the disk gives: less than the slot for int8 units
        self.io.submit(load, target, chunks)

    def _copy_finished(self) -> None:
        """CUDA: start the copies of reads that have landed, in plan order, so copies overlap compute."""
        self.io.progress()
        for load in self.inflight.values():
            if load.copied is None and load.done.is_set() and load.error is None:
                self.stage.copy(load, self.arena, load.host_off)

    def _wait(self, load: Load) -> None:
        if not load.done.is_set():
            t0 = Trace.now()
            self.io.wait(load)
            t1 = Trace.now()
            self.stats.stall_ns += t1 - t0
            self.trace.add(f"wait u{load.uid}", "wait", t0, t1, "compute")
        if load.error is not None:
            err = load.error
            name = self.units[load.uid].name
            raise ReadError(f"reading unit {load.uid} ({name}) failed: {err}") from err
        if self.checks.get(load.uid):
            self._verify(load)
        if self.stage is not None:
            if load.copied is None:
                self.stage.copy(load, self.arena, load.host_off)
            self.stage.ready(load)
        if self.layouts[load.uid].expand:  # int8 weights: dequantised in place once verified (runtime/dequant.py)
            expand(self.arena.buf, load.addr, self.layouts[load.uid].expand)

    def _verify(self, load: Load) -> None:
        t0 = Trace.now()
        mem, base = (self.arena.mem, load.addr) if self.stage is None else (self.stage.host.mem, load.host_off)
        try:
            verify(mem, base, self.checks[load.uid], f"unit {load.uid} ({self.units[load.uid].name})")
        except ChecksumError as e:
            load.error = e  # the load's bytes are wrong: never bound, given back by the caller
            raise
        self.trace.add(f"verify u{load.uid}", "verify", t0, Trace.now(), "compute")

    # ---- resident units and shutdown ------------------------------------------------------------
    def _load_resident(self) -> None:
        loads = [Load(uid, None, addr, self.sizes[uid]) for uid, addr in self.plan.resident]
        if self.stage is None:  # all at once; staged loads share the pinned buffer, so one by one
            for load in loads:
                self._submit(load)
        try:
            self._bind_resident(loads)
        except BaseException:  # a shared arena outlives this executor: wait, then give its bytes back
            held = [ld for ld in loads if self.stage is None or ld.pending or ld.done.is_set()]
            for load in held:
                self.io.wait(load)
            self.arena.drop(sum(ld.nbytes for ld in held))
            for name in self.resident_views:  # and the model holds no view into bytes it no longer owns
                for o in self.cap.owners.get(name, ()):
                    o.assign(self.cap.originals[name])
            raise

    def _bind_resident(self, loads: list[Load]) -> None:
        self._bind_resident_units(loads)
        check_resident_splits(self)

    def _bind_resident_units(self, loads: list[Load]) -> None:
        for load in loads:
            if self.stage is not None:
                self._submit(load)
            self._wait(load)
            for name, off in self.layouts[load.uid].tensor_offsets:
                if name not in self.resident_views:
                    view = self._view(name, load.addr + off)
                    self.resident_views[name] = view
                    if name in self.cap.owners:  # (not a block's rows: lookup.py takes those)
                        self._set(name, view)

    def close(self) -> None:
        """Wait for every read in flight, then give every tensor back its original (meta) object."""
        for load in list(self.inflight.values()):
            self.io.wait(load)
        self.inflight.clear()
        # Give the arena's accounting back: a Session's arena outlives its executors.
        self.arena.drop(sum(ld.nbytes for ld in self.live) + sum(self.sizes[u] for u, _ in self.plan.resident))
        for name, owners in self.cap.owners.items():
            for o in owners:
                o.assign(self.cap.originals[name])
        self.live.clear()
        self.bound.clear()
        self.holders.clear()
        self.bound_by.clear()
        self.resident_views.clear()
        self._views.clear()
