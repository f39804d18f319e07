"""The default planner once costs are known: pick the ring size and the resident set by simulation.

A streamed byte costs disk time; it is free when compute around it is long enough to hide it. So the
units worth keeping resident are the *dense* ones, many bytes read for little compute (ResNet's last stage,
an LM head), and the ring only needs to be big enough to read ahead across the sparse stretches. For
a handful of ring sizes (multiples of the largest unit, up to the whole budget), the rest of the budget
is filled with the densest units first; and where a few units are larger than the rest, with those
resident first beside rings of multiples of a smaller slot. Each candidate is simulated and the fastest
wins.

Monotone in the budget. Latency is not monotone in the ring size nor in the resident set (a unit kept
resident moves every later load's ring offset, and a wrap can land on bytes still in use), so the
candidates made at one budget can all lose to one made at a smaller budget. A plan that fits a budget
fits every larger one, so greedy plans at a fixed grid of budgets (every page when the model spans few
pages, else geometric from the minimum to the whole model, as fine as the program's length allows)
and returns the best candidate of every grid budget up to the one asked: the candidates at a larger
budget include those at a smaller one, so its predicted latency can never be worse. The price is that
the budget between the grid point below and the one asked is left unused (at most one grid step:
`budget_grid`). About a dozen simulations per grid point (up to 21 with a few large units), so
milliseconds per point for hundreds of units.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from ..units import Program
from .cost import CostModel
from .fill import plan_fill
from .simulate import Prediction, latency, simulate
from .types import Plan, check_budget, make_plan, min_budget

RING_MULTIPLES = (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)
SHRINK_LEVELS = 3  # slot sizes below the largest at which greedy also plans with every larger unit resident
SHRINK_MULTIPLES = 3  # the first RING_MULTIPLES, of that size, as those plans' rings
SHRINK_UNITS = 8  # at most this many units larger than the size; more, and those rings are not tried (cost)
PAGE = 4096  # slot sizes are whole pages, so budgets finer than a page plan alike
GRID_MAX = 128  # grid budgets at most (every page when the model spans fewer pages above its minimum)
GRID_MIN = 8  # grid budgets at least, however long the program
CHAIN_PLANS = 6  # plans per chain: the budget between two grid points used in this many steps
# Distinct plans simulated per grid point, about (candidates less repeats, plus a chain); up to 9 more
# where a few units are larger than the rest (the rings with those resident), which the grid leaves out.
SIMS_PER_POINT = 11
GRID_STEP_SIMS = 150_000  # steps simulated (3 calls each) walking the whole grid: sets how fine it is


def _density(program: Program, sizes: dict[int, int], costs: CostModel) -> dict[int, float]:
    """Bytes read per second of compute that a unit's reads must hide behind, summed over its steps.

    Bytes *read*, not slot bytes: the read time is what keeping a unit resident saves, and its slot is
    what that costs the budget, so an int8 unit that reads a quarter of its slot ranks as a quarter as
    dense as a float unit of the same slot and compute. A unit that reads its slot ranks as before.
    """
    comp: dict[int, float] = {}
    loads: dict[int, int] = {}
    for i, u in enumerate(program.steps):
        comp[u] = comp.get(u, 0.0) + costs.compute_s[i]
        loads[u] = loads.get(u, 0) + 1
    return {u: costs.unit_read_bytes(u, sizes[u]) * loads[u] / max(comp[u], 1e-6) for u in comp}


def _paged(ring: int) -> int:
    return ring - ring % PAGE


def _build(program: Program, sizes: dict[int, int], budget: int, ring: int, order: list[int],
           pinned: list[int]) -> Plan | None:
    resident = list(pinned)
    room = budget - ring - sum(sizes[u] for u in pinned)
    for u in order:
        if sizes[u] <= room:
            resident.append(u)
            room -= sizes[u]
    kept = set(resident)
    loads = [u for u in program.steps if u not in kept]
    if loads and max(sizes[u] for u in loads) > ring:
        return None
    ring = min(ring, sum(sizes[u] for u in loads)) if loads else 0
    return make_plan(budget, resident, loads, sizes, ring, "greedy")


def budget_grid(program: Program, sizes: dict[int, int]) -> tuple[int, ...]:
    """The budgets greedy plans at: the minimum, the whole model, and points between.

    As many points as keep the simulations of the whole walk near GRID_STEP_SIMS steps (a long program
    gets a coarser grid: 1,000 steps, 8 points; 100 steps, 45; 40 steps, 113), every page between when
    that many cover them, else spaced geometrically.
    Fixed per program and sizes, never per budget asked: that is what makes greedy monotone.
    """
    lo, _ = min_budget(program, sizes)
    used = set(program.steps) | {u.uid for u in program.units if u.pinned}
    hi = max(lo, sum(sizes[u] for u in used))
    k = max(GRID_MIN, min(GRID_MAX, GRID_STEP_SIMS // max(1, SIMS_PER_POINT * 3 * len(program.steps))))
    if hi - lo <= k * PAGE:
        return tuple(range(lo, hi, PAGE)) + (hi,)
    pts = {lo, hi} | {lo + (int(lo * (hi / lo) ** (i / (k - 1))) - lo) // PAGE * PAGE for i in range(1, k - 1)}
    return tuple(sorted(p for p in pts if lo <= p <= hi))


def _candidates(program: Program, sizes: dict[int, int], budget: int, order: list[int],
                pinned: list[int], largest: int) -> Iterator[Plan]:
    """The plans greedy tries at one budget: the fill baseline, one per ring size (multiples of the largest
    unit), and where a few units are larger than the rest, those resident beside rings of a smaller slot."""
    # The baseline is a candidate too: greedy must never lose to the plan it replaces (the rings below are
    # multiples of a unit, so near the whole model's bytes only fill keeps all but a few resident).
    yield plan_fill(program, sizes, budget)
    free = budget - sum(sizes[u] for u in pinned)
    for ring in sorted({min(free, int(m * largest)) for m in RING_MULTIPLES} | {free}):
        plan = _build(program, sizes, budget, _paged(ring), order, pinned)
        if plan is not None:
            yield plan
    # A ring need only hold the largest unit streamed: where a few units are larger than the rest,
    # keeping them resident (densest or not) lets a smaller ring leave room for more. Per slot size below
    # the largest (the next few), every larger unit resident first, then the densest, beside rings of a
    # few multiples of that size.
    levels = sorted({sizes[u] for u in order}, reverse=True)
    for level in levels[1:1 + SHRINK_LEVELS]:
        larger = [u for u in order if sizes[u] > level]
        if len(larger) > SHRINK_UNITS:
            break
        first = larger + [u for u in order if sizes[u] <= level]
        for m in RING_MULTIPLES[:SHRINK_MULTIPLES]:
            plan = _build(program, sizes, budget, _paged(min(free, int(m * level))), first, pinned)
            if plan is not None:
                yield plan


def _chain(program: Program, sizes: dict[int, int], base: Plan, order: list[int], room: int, most: int) -> list[Plan]:
    """`base` with more units resident, densest first, as many as fit `room` bytes: at most `most` plans.

    The ring stays `base`'s (the loads only get fewer), so each plan keeps its read-ahead and adds
    resident units, in `room` cut into `most` even steps.
    """
    kept = base.resident_ids
    added, used = [], 0
    for u in order:
        if u not in kept and used + sizes[u] <= room:
            added.append(u)
            used += sizes[u]
    if not added or not base.loads:
        return []
    cuts = sorted({-(-len(added) * j // most) for j in range(1, most + 1)})
    out = []
    for c in cuts:
        resident = [u for u, _ in base.resident] + added[:c]
        now = set(resident)
        loads = [u for u in program.steps if u not in now]
        ring = min(base.ring_bytes, sum(sizes[u] for u in loads)) if loads else 0
        out.append(make_plan(base.budget_bytes, resident, loads, sizes, ring, "greedy"))
    return out


class _Best:
    """The fastest plan among those offered, the first offered winning ties; simulations memoised."""

    def __init__(self, program: Program, sizes: dict[int, int], costs: CostModel, memo: dict | None = None):
        self.args = (program, sizes, costs)
        self.plan: Plan | None = None
        self.latency_s = float("inf")
        self._memo: dict[tuple, float] = {} if memo is None else memo

    def offer(self, plan: Plan) -> None:
        key = (plan.resident, plan.ring_bytes, plan.loads)
        if key not in self._memo:
            self._memo[key] = latency(*self.args, plan)
        if self._memo[key] < self.latency_s:
            self.plan, self.latency_s = plan, self._memo[key]

    def copy(self) -> "_Best":
        other = _Best(*self.args, memo=self._memo)
        other.plan, other.latency_s = self.plan, self.latency_s
        return other


def plan_greedy_many(program: Program, sizes: dict[int, int], costs: CostModel,
                     budgets: list[int]) -> list[tuple[Plan, Prediction]]:
    """`plan_greedy` at each budget, in one walk up the grid (a frontier sweep shares the simulations).

    The plans compared at budget b are: every grid budget's candidates up to b; every *chain* (a grid
    budget's best plan with the densest units that fit before the next grid budget added, the ring
    kept) below b; and the members of the chain of b's own grid cell that fit b. That set contains the
    set of every smaller budget, and the fastest of a larger set is never slower, so the latency can
    never rise with the budget. The first plan offered wins ties, in a fixed order, so each budget's
    answer is the same whichever other budgets are asked with it. Once a plan is as fast as pure
    compute nothing can beat it, so the walk stops there (at the same grid budget for every budget).
    """
    for b in budgets:
        check_budget(program, sizes, b)
    pinned = [u.uid for u in program.units if u.pinned]
    dens = _density(program, sizes, costs)
    order = sorted((u for u in dens if u not in pinned), key=lambda u: -dens[u])
    largest = max(sizes[u] for u in dens) if dens else 0
    floor = costs.compute_total_s * (1 + 1e-9)  # no plan beats pure compute (float sums aside)
    best = _Best(program, sizes, costs)
    answers: dict[int, Plan] = {}
    pending = sorted(set(budgets))
    grid = budget_grid(program, sizes)
    for k, g in enumerate(grid):
        if not pending:
            break
        for plan in _candidates(program, sizes, g, order, pinned, largest):
            best.offer(plan)
        assert best.plan is not None  # fill always plans at a budget >= the minimum
        if k + 1 == len(grid) or best.latency_s <= floor:  # the rest of the grid cannot do better
            answers.update((b, best.plan) for b in pending)
            # A budget that holds every unit keeps them all resident: as fast (up to the float rounding of
            # a simulation whose computes were split around reads), and it reads nothing.
            whole = [b for b in pending if b >= grid[-1]]
            if whole and best.plan.loads:
                everything = plan_fill(program, sizes, whole[0])
                if not everything.loads and latency(program, sizes, costs, everything) <= best.latency_s * (1 + 1e-9):
                    answers.update((b, everything) for b in whole)
            break
        nxt = grid[k + 1]
        chain = _chain(program, sizes, best.plan, order, nxt - 1 - best.plan.arena_bytes, CHAIN_PLANS)
        while pending and pending[0] < nxt:  # budgets in this cell: the chain members that fit them
            b = pending.pop(0)
            mine = best.copy()
            for plan in chain:
                if plan.arena_bytes <= b:
                    mine.offer(plan)
            answers[b] = mine.plan
        for plan in chain:
            best.offer(plan)
    out = []
    for b in budgets:
        plan = replace(answers[b], budget_bytes=b)
        out.append((plan, simulate(program, sizes, costs, plan)))
    return out


def plan_greedy(program: Program, sizes: dict[int, int], costs: CostModel, budget: int) -> tuple[Plan, Prediction]:
    """The best plan found under `budget`, with its predicted warm latency (never worse at a larger budget)."""
    return plan_greedy_many(program, sizes, costs, [budget])[0]
