"""The simple default planner: a ring big enough to overlap reads with compute, the rest resident.

When streaming is bound by the disk, every byte kept resident is a byte not read per call, so after
the ring gets room to read ahead (about three of the largest streamed units: one being computed, one
being read, and the waste of one wrap), the rest of the budget is filled with resident units, largest
first. The cost-model planners (greedy, CP-SAT) will improve on this choice; it is the baseline.
"""
from __future__ import annotations

from ..units import Program
from .types import Plan, check_budget, make_plan

READ_AHEAD_UNITS = 3  # ring target, in multiples of the largest streamed unit


def _ring_target(streamed_sizes: list[int]) -> int:
    if not streamed_sizes:
        return 0
    return min(READ_AHEAD_UNITS * max(streamed_sizes), sum(streamed_sizes))


def plan_fill(program: Program, sizes: dict[int, int], budget: int) -> Plan:
    """Plan `program` under `budget` bytes of arena; `sizes` maps unit id -> slot bytes."""
    check_budget(program, sizes, budget)
    pinned = [u.uid for u in program.units if u.pinned]
    used = set(program.steps) | set(pinned)
    candidates = sorted((u for u in used if u not in pinned), key=lambda u: (-sizes[u], u))
    resident = list(pinned)
    res_bytes = sum(sizes[u] for u in resident)
    streamed = set(candidates)

    def step_sizes(stream: set[int]) -> list[int]:
        return [sizes[u] for u in program.steps if u in stream]

    for u in candidates:
        rest = streamed - {u}
        # The ring never needs more than keeping all of `rest` resident would cost (a unit loaded
        # several times per call counts once there), so a budget that holds everything streams nothing.
        ring_need = min(_ring_target(step_sizes(rest)), sum(sizes[x] for x in rest))
        if res_bytes + sizes[u] + ring_need <= budget:
            resident.append(u)
            res_bytes += sizes[u]
            streamed = rest
    loads = [u for u in program.steps if u in streamed]
    ring = min(budget - res_bytes, sum(sizes[u] for u in loads)) if loads else 0
    return make_plan(budget, resident, loads, sizes, ring - ring % 4096, "fill")
