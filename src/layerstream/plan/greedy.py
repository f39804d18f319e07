"""The default planner once costs are known: pick the ring size and the resident set by simulation.

A streamed byte costs disk time; it is free when compute around it is long enough to hide it. So the
units worth keeping resident are the *dense* ones, many bytes for little compute (ResNet's last stage,
an LM head), and the ring only needs to be big enough to read ahead across the sparse stretches. For
a handful of ring sizes (multiples of the largest streamed unit, up to the whole budget), the rest of
the budget is filled with the densest units first; each candidate is simulated and the fastest wins.
About a dozen simulations: milliseconds for hundreds of units.
"""
from __future__ import annotations

from ..units import Program
from .cost import CostModel
from .fill import plan_fill
from .simulate import Prediction, simulate
from .types import Plan, check_budget, make_plan

RING_MULTIPLES = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def _density(program: Program, sizes: dict[int, int], costs: CostModel) -> dict[int, float]:
    """Bytes per second of compute that a unit's reads must hide behind, summed over its steps."""
    comp: dict[int, float] = {}
    for i, u in enumerate(program.steps):
        comp[u] = comp.get(u, 0.0) + costs.compute_s[i]
    loads = {u: program.steps.count(u) for u in comp}
    return {u: sizes[u] * loads[u] / max(comp[u], 1e-6) for u in comp}


def _build(program: Program, sizes: dict[int, int], budget: int, ring: int, order: list[int],
           pinned: list[int]) -> Plan | None:
    resident = list(pinned)
    room = budget - ring - sum(sizes[u] for u in pinned)
    for u in order:
        if sizes[u] <= room:
            resident.append(u)
            room -= sizes[u]
    loads = [u for u in program.steps if u not in resident]
    if loads and max(sizes[u] for u in loads) > ring:
        return None
    ring = min(ring, sum(sizes[u] for u in loads)) if loads else 0
    return make_plan(budget, resident, loads, sizes, ring, "greedy")


def plan_greedy(program: Program, sizes: dict[int, int], costs: CostModel, budget: int) -> tuple[Plan, Prediction]:
    """The best plan found under `budget`, with its predicted warm latency."""
    check_budget(program, sizes, budget)
    pinned = [u.uid for u in program.units if u.pinned]
    dens = _density(program, sizes, costs)
    order = sorted((u for u in dens if u not in pinned), key=lambda u: -dens[u])
    largest = max(sizes[u] for u in dens) if dens else 0
    free = budget - sum(sizes[u] for u in pinned)
    rings = sorted({min(free, int(m * largest)) for m in RING_MULTIPLES} | {free})
    # The baseline is a candidate too: greedy must never lose to the plan it replaces (its rings are
    # multiples of the largest unit, so near the whole model's bytes only fill keeps all but a few resident).
    fill = plan_fill(program, sizes, budget)
    best: tuple[Plan, Prediction] = (fill, simulate(program, sizes, costs, fill))
    for ring in rings:
        ring -= ring % 4096
        plan = _build(program, sizes, budget, ring, order, pinned)
        if plan is None:
            continue
        pred = simulate(program, sizes, costs, plan)
        if pred.latency_s < best[1].latency_s * 0.999:
            best = (plan, pred)
    return best
