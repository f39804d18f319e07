"""The event simulator every planner and test trusts: a Plan's warm latency and peak bytes, predicted.

It follows the executor's rules exactly: planned loads are issued in order, each as soon as every
earlier load that occupied its ring bytes has been released, and at most one call ahead; the disk
serves loads one after another (reads in flight share its bandwidth, so FIFO service gives the same
finish times for the queue as a whole), each for the time of the bytes it reads (less than its slot
for int8 and gather units: `CostModel.read_bytes`) while it holds its whole slot in the ring; compute
of a step waits for its load; a step's unit is released when its compute ends. Calls run back to
back, so the next call's first loads read during this call's tail, as in the runtime. Compute runs
`1 + CostModel.read_slowdown` times slower while the disk reads and the disk `1 + disk_slowdown`
times slower while compute runs (the development VM's two vCPUs serve torch's threads and the host's
I/O), and during one compute the disk reads at most `inflight_bytes` (kernel AIO's reads in flight)
per time the compute thread tops up the queue during it (`CostModel.refills_of`: each root's
pre-hook, and a streamed unit's release), so loads are issued as soon as they may be and the two
are advanced together, from one event (a compute's end, a read's end) to the next.

Planners call it hundreds of times per plan, so it is linear in the loads: releases happen in load
order, so of the earlier loads sharing a load's ring bytes only the nearest one can be the last to
free them, and which one that is depends only on the plan (computed once, not once per load per call).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from ..units import Program
from .cost import CostModel
from .types import Plan


@dataclass(frozen=True)
class Prediction:
    latency_s: float  # one warm call, in steady state
    stall_s: float  # compute waiting for reads, in that call
    stalls_s: tuple[float, ...]  # per step
    peak_bytes: int  # arena bytes live at once, at most


@dataclass(frozen=True)
class Timeline:
    """Every event time of a simulated run (absolute seconds from the first call's start).

    The CP-SAT planner starts its search from the greedy plan's schedule; this is that schedule.
    """

    latency_s: float  # the last call
    stalls_s: tuple[float, ...]  # the last call, per step
    call_start_s: float  # the last call's start
    compute_start_s: tuple[float, ...]  # the last call, per step: when its compute started
    load_of_step: tuple[int, ...]  # the last call, per step: absolute load index, -1 if resident
    issued_s: tuple[float, ...]  # per absolute load: ring bytes free, read may start
    read_start_s: tuple[float, ...]  # per absolute load: the disk starts it
    released_s: tuple[float, ...]  # per absolute load: its step's compute ended
    load_bytes: tuple[int, ...]  # per absolute load: the slot bytes it holds

    @property
    def compute_s(self) -> float:
        """The last call's compute (its pre and every step), as reading slowed it: all but its stalls."""
        return self.latency_s - sum(self.stalls_s)


def _nearest_sharer(offs: list[int], lsize: list[int], ring: int) -> list[int]:
    """Per load i: how many loads back (cyclically) the nearest earlier load sharing its ring bytes is, or 0.

    Only loads within the last lap of the ring count (as in the executor, which looks back until the
    bytes it passed cover the ring). Found by painting the ring with load indices over two laps and
    asking, in the second, which index last painted any of the load's bytes.
    """
    n = len(offs)
    starts: list[int] = []  # painted segments, sorted and disjoint: [starts[k], ends[k]) by idxs[k]
    ends: list[int] = []
    idxs: list[int] = []
    prefix = [0] * (2 * n + 1)  # bytes of loads 0..j-1 over the two laps
    for j in range(2 * n):
        prefix[j + 1] = prefix[j] + lsize[j % n]
    out = [0] * n
    for j in range(2 * n):
        i = j % n
        a = offs[i]
        b = a + lsize[i]
        lo = k = bisect_left(ends, a + 1)  # first segment ending after a
        last = -1
        while k < len(starts) and starts[k] < b:
            if idxs[k] > last:
                last = idxs[k]
            k += 1
        if j >= n and last >= 0 and prefix[j] - prefix[last + 1] < ring:
            out[i] = j - last
        # repaint [a, b) with j, keeping the parts of the overlapped segments outside it
        if lo == k:
            starts.insert(lo, a), ends.insert(lo, b), idxs.insert(lo, j)
            continue
        head = (starts[lo], a, idxs[lo]) if starts[lo] < a else None
        tail = (b, ends[k - 1], idxs[k - 1]) if ends[k - 1] > b else None
        segs = [x for x in (head, (a, b, j), tail) if x is not None]
        starts[lo:k] = [x[0] for x in segs]
        ends[lo:k] = [x[1] for x in segs]
        idxs[lo:k] = [x[2] for x in segs]
    return out


def _run(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, calls: int,
         record: bool = True) -> Timeline | float:
    """The run's Timeline, or only the last call's latency when not `record`ing (what planners need)."""
    resident = plan.resident_ids
    n_load = len(plan.loads)
    offs = [off for _, off in plan.loads]
    lsize = [sizes[u] for u, _ in plan.loads]  # slot bytes: what a load holds in the ring
    rsize = [costs.unit_read_bytes(u, s) for (u, _), s in zip(plan.loads, lsize)]  # what it reads: maybe less
    read_s = [costs.read_s(b) for b in rsize]  # with the disk alone
    sharer = _nearest_sharer(offs, lsize, plan.ring_bytes) if n_load else []
    cslow = 1.0 + costs.read_slowdown  # compute's slowdown while the disk reads
    dslow = 1.0 + costs.disk_slowdown  # the disk's while compute runs
    work = [(uid in resident, c, costs.refills_of(i, uid not in resident))
            for i, (uid, c) in enumerate(zip(program.steps, costs.compute_s))]
    released: list[float] = []  # per absolute load index
    issued: list[float] = []
    started: list[float] = []
    done: list[float] = []
    consumed: list[float] = []
    # The disk reads at most this long (alone) during one compute per top-up of kernel AIO's queue (the
    # reads in flight then: it is refilled only on the compute thread, at roots' hooks and releases)
    cap = costs.inflight_bytes / costs.read_bps if costs.inflight_bytes and costs.read_bps > 0 else float("inf")
    coupled = cslow != 1.0 or dslow != 1.0 or cap != float("inf")
    t = 0.0
    # The disk's current read (load len(done), if one is issued and not done): when it ends at the
    # current rates (uncoupled: its rate never changes, so this is exact) and how long it has left alone.
    head_end = head_left = 0.0

    def start_read(now: float) -> None:
        nonlocal head_end, head_left
        started.append(now)
        head_left = read_s[len(done) % n_load]
        head_end = now + head_left

    def issue_until(now: float) -> None:
        """Issue, in order, every load whose ring bytes are free and whose call is at most one ahead by
        `now` (issues happen only when a step starts or ends: nothing joins the queue mid-compute)."""
        while n_load:
            j = len(issued)
            t_issue = issued[-1] if issued else 0.0
            d = sharer[j % n_load]
            if d and j >= d:
                if released[j - d] > now:  # (inf: its step has not ended)
                    return
                t_issue = max(t_issue, released[j - d])
            if j >= n_load:
                if len(consumed) <= j - n_load or consumed[j - n_load] > now:
                    return
                t_issue = max(t_issue, consumed[j - n_load])
            if t_issue > now:
                return
            released.append(float("inf"))  # placeholder until its step releases it
            issued.append(t_issue)
            if len(done) == j:  # the disk was idle: this read starts now
                start_read(now)

    def finish_read(now: float) -> None:  # the head read ends at `now`; the next queued one starts
        done.append(now)
        if len(done) < len(issued):
            start_read(now)

    def compute(c: float, refills: int = 1) -> None:
        """Run `c` s of compute (as long alone) from t; the disk reads beside it, each slowing the other."""
        nonlocal t, head_left
        if not coupled:  # (kept apart so that sums of times come out exactly as written)
            end = t + c
            while len(done) < len(issued) and head_end <= end:
                finish_read(head_end)
            t = end
            return
        room = cap * refills  # what the disk may still read during this compute, in seconds alone
        while len(done) < len(issued) and room > 0:
            if c * cslow < min(head_left, room) * dslow:  # the compute ends first
                t += c * cslow
                head_left -= c * cslow / dslow
                return
            if room < head_left:  # the reads in flight are done: the disk idles until the compute ends
                dt = room * dslow
                t += dt
                c = max(0.0, c - dt / cslow)
                head_left -= room
                break
            dt = head_left * dslow
            t += dt
            c = max(0.0, c - dt / cslow)  # (it may end with the read: nothing left, not a float below 0)
            room -= head_left
            finish_read(t)
        t += c

    def wait_for(k: int) -> None:  # compute idle until load k is in: the disk reads alone
        nonlocal t
        while len(done) <= k:
            t = head_end if not coupled else t + head_left
            finish_read(t)

    call_start = 0.0
    stalls: list[float] = []
    starts: list[float] = []
    load_of: list[int] = []
    k = 0  # next load to consume (absolute index)
    for _ in range(calls):
        call_start = t
        issue_until(t)
        compute(costs.pre_s)
        stalls, starts, load_of = [], [], []
        for is_resident, c, refills in work:
            issue_until(t)
            if is_resident:
                if record:
                    stalls.append(0.0)
                    starts.append(t)
                    load_of.append(-1)
                compute(c, refills)
                continue
            t0 = t  # (its load was issued by now: the loads it waits for were released before this step)
            wait_for(k)
            if record:
                stalls.append(t - t0)
                starts.append(t)
                load_of.append(k)
            consumed.append(t)
            issue_until(t)  # the next call's load of this slot may start now
            compute(c, refills)
            released[k] = t
            k += 1
    if not record:
        return t - call_start
    return Timeline(t - call_start, tuple(stalls), call_start, tuple(starts), tuple(load_of), tuple(issued),
                    tuple(started), tuple(released), tuple(lsize[j % n_load] for j in range(len(issued))))


def latency(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, calls: int = 3) -> float:
    """`simulate(...).latency_s` without the peak-bytes sweep: what planners compare candidates by."""
    return _run(program, sizes, costs, plan, calls, record=False)


def timeline(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, calls: int = 3) -> Timeline:
    """Every event time of `calls` back-to-back calls of `plan`."""
    return _run(program, sizes, costs, plan, calls)


def simulate(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, calls: int = 3) -> Prediction:
    """Predict `plan` over `calls` back-to-back calls; report the last (a warm call in steady state)."""
    tl = _run(program, sizes, costs, plan, calls)
    events = sorted([(tl.issued_s[j], tl.load_bytes[j]) for j in range(len(tl.issued_s))]
                    + [(tl.released_s[j], -tl.load_bytes[j]) for j in range(len(tl.issued_s))],
                    key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, delta in events:  # releases sort before issues at the same instant, as in the runtime
        live += delta
        peak = max(peak, live)
    return Prediction(tl.latency_s, sum(tl.stalls_s), tl.stalls_s, plan.ring_offset + peak)
