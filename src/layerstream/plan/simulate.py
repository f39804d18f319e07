"""The event simulator every planner and test trusts: a Plan's warm latency and peak bytes, predicted.

It follows the executor's rules exactly: planned loads are issued in order, each as soon as every
earlier load that occupied its ring bytes has been released, and at most one call ahead; the disk
serves loads one after another (reads in flight share its bandwidth, so FIFO service gives the same
finish times for the queue as a whole); compute of a step waits for its load; a step's unit is
released when its compute ends. Calls run back to back, so the next call's first loads read during
this call's tail, as in the runtime.
"""
from __future__ import annotations

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


def simulate(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, calls: int = 3) -> Prediction:
    """Predict `plan` over `calls` back-to-back calls; report the last (a warm call in steady state)."""
    resident = plan.resident_ids
    steps = program.steps
    n_load = len(plan.loads)
    offs = [off for _, off in plan.loads]
    lsize = [sizes[u] for u, _ in plan.loads]
    released: list[float] = []  # per absolute load index
    issued: list[float] = []
    done: list[float] = []
    disk_free = 0.0
    t = 0.0
    call_start = 0.0
    stalls: list[float] = []
    k = 0  # next load to consume (absolute index)

    def issue(j: int) -> None:
        """Issue load j: after the previous occupants of its bytes are released, and in order."""
        nonlocal disk_free
        off, s = offs[j % n_load], lsize[j % n_load]
        t_issue = issued[-1] if issued else 0.0
        back, covered = j - 1, 0
        while back >= 0 and covered < plan.ring_bytes:  # only the last lap can overlap
            bi = back % n_load
            if offs[bi] < off + s and off < offs[bi] + lsize[bi]:
                t_issue = max(t_issue, released[back])
            covered += lsize[bi]
            back -= 1
        if j >= n_load:  # at most one call ahead: load j waits for load j - n to be consumed
            t_issue = max(t_issue, consumed[j - n_load])
        issued.append(t_issue)
        start = max(t_issue, disk_free)
        disk_free = start + costs.read_s(s)
        done.append(disk_free)

    consumed: list[float] = []
    scale = costs.compute_scale(sum(lsize))  # compute slowed by the bytes this plan reads per call
    for c in range(calls):
        call_start = t
        t += costs.pre_s * scale
        stalls = []
        for i, uid in enumerate(steps):
            stall = 0.0
            if uid not in resident:
                while len(issued) <= k:
                    released.append(float("inf"))  # placeholder until its step releases it
                    issue(len(issued))
                stall = max(0.0, done[k] - t)
                t = max(t, done[k])
                consumed.append(t)
            stalls.append(stall)
            t += costs.compute_s[i] * scale
            if uid not in resident:
                released[k] = t
                k += 1
    events = sorted([(issued[j], lsize[j % n_load]) for j in range(len(issued))]
                    + [(released[j], -lsize[j % n_load]) for j in range(len(issued))], key=lambda e: (e[0], e[1]))
    live = peak = 0
    for _, delta in events:  # releases sort before issues at the same instant, as in the runtime
        live += delta
        peak = max(peak, live)
    return Prediction(t - call_start, sum(stalls), tuple(stalls), plan.ring_offset + peak)
