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


def plan_fill(program: Program, sizes: dict[int, int], budget: int) -> Plan:
    """Plan `program` under `budget` bytes of arena; `sizes` maps unit id -> slot bytes."""
    check_budget(program, sizes, budget)
    pinned = [u.uid for u in program.units if u.pinned]
    used = set(program.steps) | set(pinned)
    candidates = sorted((u for u in used if u not in pinned), key=lambda u: (-sizes[u], u))
    resident = list(pinned)
    res_bytes = sum(sizes[u] for u in resident)
    loads_of: dict[int, int] = {}
    for u in program.steps:
        loads_of[u] = loads_of.get(u, 0) + 1
    # Running totals over the streamed units, so each candidate costs O(1) (a thousand units: milliseconds).
    step_bytes = sum(sizes[u] * loads_of[u] for u in candidates)  # bytes streamed per call
    unit_bytes = sum(sizes[u] for u in candidates)  # what keeping them all resident would cost
    rejected: list[int] = []  # candidates kept streamed, largest first
    for i, u in enumerate(candidates):
        rest_steps = step_bytes - sizes[u] * loads_of[u]
        rest_units = unit_bytes - sizes[u]
        # the largest unit left streaming: a rejected one (they came first), else the next candidate
        largest = sizes[rejected[0]] if rejected else (sizes[candidates[i + 1]] if i + 1 < len(candidates) else 0)
        # The ring never needs more than keeping all of `rest` resident would cost (a unit loaded
        # several times per call counts once there), so a budget that holds everything streams nothing.
        ring_need = min(READ_AHEAD_UNITS * largest, rest_steps, rest_units)
        if res_bytes + sizes[u] + ring_need <= budget:
            resident.append(u)
            res_bytes += sizes[u]
            step_bytes, unit_bytes = rest_steps, rest_units
        else:
            rejected.append(u)
    kept = set(resident)
    loads = [u for u in program.steps if u not in kept]
    ring = min(budget - res_bytes, sum(sizes[u] for u in loads)) if loads else 0
    return make_plan(budget, resident, loads, sizes, ring - ring % 4096, "fill")
