"""The event simulator every planner and test trusts: a Plan's warm latency and peak bytes, predicted.

It follows the executor's rules exactly: planned loads are issued in order, each as soon as every
earlier load that occupied its ring bytes has been released, and at most one call ahead; the disk
serves loads one after another (reads in flight share its bandwidth, so FIFO service gives the same
finish times for the queue as a whole), each for the time of the bytes it reads (less than its slot
for int8 and gather units: `CostModel.read_bytes`) while it holds its whole slot in the ring; compute
of a step waits for its load; a step's unit is released when its compute ends. Calls run back to
back, so the next call's first loads read during this call's tail, as in the runtime. Compute runs
`1 + CostModel.read_slowdown` times slower while the disk reads (the host's steal on the development
VM), so loads are issued as soon as they may be: each compute sees the reads queued beside it.

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
    compute_s: float = 0.0  # the last call's compute (its pre and every step), as reading slowed it


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
    read_s = [costs.read_s(b) for b in rsize]
    sharer = _nearest_sharer(offs, lsize, plan.ring_bytes) if n_load else []
    slow = 1.0 + costs.read_slowdown  # compute's slowdown while the disk reads
    work = [(uid in resident, c) for uid, c in zip(program.steps, costs.compute_s)]
    released: list[float] = []  # per absolute load index
    issued: list[float] = []
    started: list[float] = []
    done: list[float] = []
    consumed: list[float] = []
    disk_free = 0.0

    def issue_until(now: float) -> None:
        """Issue, in order, every load whose ring bytes are free and whose call is at most one ahead by
        `now`. Issues happen only when a step starts or ends, so once a compute starts no read joins
        the disk's queue before it ends: the disk is busy from `now` until `disk_free`, then idle."""
        nonlocal disk_free
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
            start = t_issue if t_issue > disk_free else disk_free
            started.append(start)
            disk_free = start + read_s[j % n_load]
            done.append(disk_free)

    def compute(now: float, c: float) -> float:
        """When a compute of `c` s (alone) that starts at `now` ends: slowed while the disk reads."""
        busy = disk_free - now
        if busy <= 0 or slow == 1.0:
            return now + c
        if c * slow <= busy:
            return now + c * slow
        return disk_free + c - busy / slow

    t = call_start = wall = 0.0
    stalls: list[float] = []
    starts: list[float] = []
    load_of: list[int] = []
    k = 0  # next load to consume (absolute index)
    for _ in range(calls):
        call_start = t
        issue_until(t)
        t = compute(t, costs.pre_s)
        wall = t - call_start  # compute time of this call, as slowed
        stalls, starts, load_of = [], [], []
        for is_resident, c in work:
            issue_until(t)
            if is_resident:
                if record:
                    stalls.append(0.0)
                    starts.append(t)
                    load_of.append(-1)
                end = compute(t, c)
                wall += end - t
                t = end
                continue
            ready = done[k]  # (issued by now: the loads it waits for were released before this step)
            if record:
                stalls.append(ready - t if ready > t else 0.0)
                starts.append(t if t > ready else ready)
                load_of.append(k)
            if ready > t:
                t = ready
            consumed.append(t)
            issue_until(t)  # the next call's load of this slot may start now
            end = compute(t, c)
            wall += end - t
            t = released[k] = end
            k += 1
    if not record:
        return t - call_start
    return Timeline(t - call_start, tuple(stalls), call_start, tuple(starts), tuple(load_of), tuple(issued),
                    tuple(started), tuple(released), tuple(lsize[j % n_load] for j in range(len(issued))), wall)


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
