"""Several models, one budget: how a Session splits its arena, and which model it expects next.

The arena is `[model 1 resident | model 2 resident | ... | one shared ring]`. Compute on one device runs
one call at a time, so one ring serves whichever model runs: every model's loads stream through the
same ring bytes, and only resident bytes are spent per model. The ring must hold the largest streamed
unit of any model (the floor that lets every model run, however small the budget); a few of them give
room to read ahead. Every other byte is a resident byte, and it goes where it saves the most time per
call of the workload, weighted by how often each model is called:

- before costs are known (the first calls), a byte kept resident is a byte not read per call, so units
  are ranked by reads saved per resident byte (loads per call x the model's call frequency), larger
  first among equals, and the ring gets three of the largest streamed units, as `plan_fill` does;
- once every model has a cost model, each ring size is tried with, per model, a handful of resident
  sets (densest units first, as `plan_greedy` ranks them) simulated one model at a time; the resident
  budget is shared by an exact choice of one set per model (a multiple-choice knapsack over the Pareto
  front of bytes and frequency-weighted latency). The bytes rule's plan is a candidate too, so costs
  never make the plan worse by the simulator's measure.

A model's call is simulated as if the previous call were its own: the session prefetches the next
model's first loads during the current model's tail, which is what the simulator's back-to-back calls
assume. Pure: no threads, no files, no torch.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..budget import fmt_bytes
from ..errors import BudgetError
from ..units import Program
from .cost import CostModel
from .fill import READ_AHEAD_UNITS
from .greedy import RING_MULTIPLES, _density
from .simulate import simulate
from .types import Plan, make_plan, place_ring

PAGE = 4096
SETS_PER_MODEL = 24  # resident sets simulated per model and ring size (cost planner)
FRONT_MAX = 4096  # Pareto states kept while sharing the resident budget (thinned past it)


@dataclass(frozen=True)
class ModelDemand:
    """What one model of a session asks of the arena: its program, slot sizes, call share, costs."""

    name: str
    program: Program
    sizes: dict[int, int]  # unit id -> slot bytes
    weight: float = 1.0  # relative call frequency in the workload
    costs: CostModel | None = None  # known after the model's first calls

    @property
    def pinned(self) -> list[int]:
        return [u.uid for u in self.program.units if u.pinned]

    @property
    def candidates(self) -> list[int]:
        """Units that stream unless kept resident (used in a call, not pinned)."""
        pinned = set(self.pinned)
        return sorted({u for u in self.program.steps if u not in pinned})


@dataclass(frozen=True)
class WorkloadPlan:
    """The session's split of its budget: a shared ring and each model's resident units."""

    budget_bytes: int
    ring_bytes: int
    resident: tuple[tuple[str, tuple[int, ...]], ...]  # (model, resident unit ids), in arena order
    planner: str  # "bytes" (reads saved per byte) or "cost" (simulated latency)
    predicted_s: tuple[tuple[str, float], ...] = ()  # (model, warm latency) where costs are known

    def plans(self, models: Sequence[ModelDemand]) -> dict[str, Plan]:
        """Each model's Plan in session coordinates: its residents in its own region, loads in the ring."""
        by_name = {m.name: m for m in models}
        out, base = {}, 0
        regions = []
        for name, ids in self.resident:
            m = by_name[name]
            placed = []
            for u in ids:
                placed.append((u, base))
                base += m.sizes[u]
            regions.append((m, tuple(placed), set(ids)))
        if base + self.ring_bytes > self.budget_bytes:
            raise BudgetError(f"workload plan: {fmt_bytes(base)} resident + {fmt_bytes(self.ring_bytes)} ring "
                              f"exceeds the budget of {fmt_bytes(self.budget_bytes)}")
        for m, placed, kept in regions:
            loads = [u for u in m.program.steps if u not in kept]
            offs = place_ring([m.sizes[u] for u in loads], self.ring_bytes)
            out[m.name] = Plan(self.budget_bytes, placed, base, self.ring_bytes, tuple(zip(loads, offs)),
                               f"session/{self.planner}")
        return out


def min_session_budget(models: Sequence[ModelDemand]) -> tuple[int, str]:
    """The smallest budget that runs every model: all pinned units plus the largest streamed unit."""
    pinned = sum(m.sizes[u] for m in models for u in m.pinned)
    big = max(((m.sizes[u], m.name, m.program.units[u].name) for m in models for u in m.candidates), default=None)
    if big is None:
        return pinned, f"{fmt_bytes(pinned)} of pinned units"
    return pinned + big[0], (f"unit {big[2]} of {big[1]} ({fmt_bytes(big[0])}) must fit the shared ring, "
                             f"beside {fmt_bytes(pinned)} of pinned units")


def plan_workload(models: Sequence[ModelDemand], budget: int) -> WorkloadPlan:
    """Split `budget` between a shared ring and each model's resident units (see the module docstring)."""
    need, why = min_session_budget(models)
    if budget < need:
        raise BudgetError(
            f"session budget {fmt_bytes(budget)} is below the minimum {fmt_bytes(need)} ({need} bytes) for "
            f"these {len(models)} model(s): {why}; raise the budget to at least {need} bytes, or add the "
            "largest model with a smaller max_unit", minimum_bytes=need)
    plan = _plan_bytes(models, budget)
    if not models or any(m.costs is None for m in models):
        return plan
    plan = _with_predictions(plan, models)
    best = _plan_cost(models, budget)
    weights = {m.name: m.weight for m in models}
    if best is not None and _total(best, weights) < _total(plan, weights) * 0.999:
        return best
    return plan


def _streamed_bytes(m: ModelDemand, kept: set[int]) -> int:
    return sum(m.sizes[u] for u in m.program.steps if u not in kept)


def _ring_for(models: Sequence[ModelDemand], resident: dict[str, list[int]], budget: int) -> int:
    """All bytes not resident, down to a page, but never more than every model's loads at once."""
    used = sum(m.sizes[u] for m in models for u in resident[m.name])
    cap = sum(_streamed_bytes(m, set(resident[m.name])) for m in models)
    ring = min(budget - used, cap)
    return ring - ring % PAGE


def _plan_bytes(models: Sequence[ModelDemand], budget: int) -> WorkloadPlan:
    """Residents ranked by reads saved per byte; a ring of three of the largest units left streaming."""
    resident = {m.name: list(m.pinned) for m in models}
    free = budget - sum(m.sizes[u] for m in models for u in m.pinned)
    ranked = sorted(((Counter(m.program.steps)[u] * m.weight, m.sizes[u], m.name, u)
                     for m in models for u in m.candidates), key=lambda r: (-r[0], -r[1], r[2], r[3]))
    sizes = {m.name: m.sizes for m in models}
    kept: set[tuple[str, int]] = set()
    for _ in range(2):  # a second pass spends what a smaller ring (big units made resident) gave back
        left = [r for r in ranked if (r[2], r[3]) not in kept]
        largest = max((r[1] for r in left), default=0)
        room = free - sum(sizes[n][u] for n, u in kept) - min(READ_AHEAD_UNITS * largest, free)
        for _, nbytes, name, u in left:
            if nbytes <= room:
                kept.add((name, u))
                room -= nbytes
    for m in models:
        resident[m.name] += [u for u in m.candidates if (m.name, u) in kept]
    # Every pass leaves at least the largest unit still streaming free (the budget is above the
    # minimum), and slot sizes are whole pages, so rounding the ring down to a page keeps it.
    ring = _ring_for(models, resident, budget)
    return WorkloadPlan(budget, ring, tuple((m.name, tuple(resident[m.name])) for m in models), "bytes")


def _local_plan(m: ModelDemand, resident: Sequence[int], ring: int, budget: int) -> Plan | None:
    kept = set(resident)
    loads = [u for u in m.program.steps if u not in kept]
    if loads and max(m.sizes[u] for u in loads) > ring:
        return None
    return make_plan(budget, list(resident), loads, m.sizes, ring, "session")


def _latency(m: ModelDemand, resident: Sequence[int], ring: int) -> float | None:
    res_bytes = sum(m.sizes[u] for u in resident)
    plan = _local_plan(m, resident, ring, res_bytes + ring)
    return None if plan is None else simulate(m.program, m.sizes, m.costs, plan).latency_s


def _with_predictions(plan: WorkloadPlan, models: Sequence[ModelDemand]) -> WorkloadPlan:
    by_name = {m.name: m for m in models}
    pred = tuple((n, _latency(by_name[n], ids, plan.ring_bytes)) for n, ids in plan.resident)
    return WorkloadPlan(plan.budget_bytes, plan.ring_bytes, plan.resident, plan.planner, pred)


def _total(plan: WorkloadPlan, weights: dict[str, float]) -> float:
    """Frequency-weighted predicted latency (infinite where a model cannot run)."""
    return sum(weights[n] * (math.inf if lat is None else lat) for n, lat in plan.predicted_s)


def _options(m: ModelDemand, ring: int, avail: int) -> list[tuple[int, float, tuple[int, ...]]]:
    """(extra resident bytes, weighted latency, resident ids) for a few resident sets of `m`."""
    pinned = m.pinned
    dens = _density(m.program, m.sizes, m.costs)
    order = sorted(m.candidates, key=lambda u: (-dens[u], u))
    total = sum(m.sizes[u] for u in order)
    top = min(total, avail)
    points = {0, top} | {int(top * (i / (SETS_PER_MODEL - 2)) ** 2) for i in range(1, SETS_PER_MODEL - 2)}
    seen, out = set(), []
    for room in sorted(points):
        chosen, used = [], 0
        for u in order:
            if used + m.sizes[u] <= room:
                chosen.append(u)
                used += m.sizes[u]
        key = tuple(sorted(chosen))
        if key in seen:
            continue
        seen.add(key)
        lat = _latency(m, pinned + chosen, ring)
        if lat is not None:
            out.append((used, m.weight * lat, tuple(pinned + chosen)))
    return out


def _pareto(states: list[tuple[int, float, tuple]]) -> list[tuple[int, float, tuple]]:
    """Keep states no other beats in both bytes and cost; thin to FRONT_MAX by byte buckets."""
    front, best = [], math.inf
    for s in sorted(states, key=lambda s: (s[0], s[1])):
        if s[1] < best:
            front.append(s)
            best = s[1]
    if len(front) > FRONT_MAX:
        step = len(front) / FRONT_MAX
        front = [front[int(i * step)] for i in range(FRONT_MAX)] + [front[-1]]
    return front


def _plan_cost(models: Sequence[ModelDemand], budget: int) -> WorkloadPlan | None:
    """The ring size and resident sets with the least simulated, frequency-weighted latency."""
    free = budget - sum(m.sizes[u] for m in models for u in m.pinned)
    largest = max((m.sizes[u] for m in models for u in m.candidates), default=0)
    rings = sorted({min(free, int(k * largest)) // PAGE * PAGE for k in RING_MULTIPLES} | {free // PAGE * PAGE})
    best: tuple[float, int, list] | None = None
    for ring in rings:
        if ring < largest:
            continue
        states: list[tuple[int, float, tuple]] = [(0, 0.0, ())]
        for m in models:
            opts = _options(m, ring, free - ring)
            states = _pareto([(b + ob, c + oc, picks + ((m.name, ids, oc / m.weight),))
                              for b, c, picks in states for ob, oc, ids in opts if b + ob <= free - ring])
        if states and (best is None or states[-1][1] < best[0] * 0.999):
            best = (states[-1][1], ring, list(states[-1][2]))
    if best is None:
        return None
    _, ring, picks = best
    resident = {name: list(ids) for name, ids, _ in picks}
    ring = max(ring, _ring_for(models, resident, budget))  # bytes no set could use go to the ring
    return WorkloadPlan(budget, ring, tuple((n, tuple(ids)) for n, ids, _ in picks), "cost",
                        tuple((n, lat) for n, _, lat in picks))


@dataclass
class Predictor:
    """Which model the session expects next: the declared sequence, else the most frequent successor.

    `cycle` repeats the declared sequence; a call out of its order resynchronises at the caller's next
    place in it. With no sequence (or past the end of one that does not cycle) the successor seen most
    often after the current model is expected, the most recent one on a tie.
    """

    sequence: tuple[str, ...] = ()
    cycle: bool = True
    frequency: dict[str, float] = field(default_factory=dict)  # declared call shares (else from `sequence`)
    pos: int = -1  # index in `sequence` of the last call, -1 before the first
    last: str | None = None
    calls: Counter = field(default_factory=Counter)
    successors: dict[str, Counter] = field(default_factory=dict)
    recent: dict[str, str] = field(default_factory=dict)  # model -> the model that last followed it

    def expect(self) -> str | None:
        """The model expected to run next, or None when nothing says."""
        if self.sequence and (self.cycle or self.pos + 1 < len(self.sequence)):
            return self.sequence[(self.pos + 1) % len(self.sequence)]
        seen = self.successors.get(self.last or "", Counter())
        if not seen:
            return None
        top = max(seen.values())
        tied = [n for n, c in seen.items() if c == top]
        return self.recent[self.last] if self.recent.get(self.last) in tied else tied[0]

    def observe(self, name: str) -> bool:
        """Record a call of `name`; True if it was the one expected (or nothing was expected)."""
        expected = self.expect()
        if self.last is not None:
            self.successors.setdefault(self.last, Counter())[name] += 1
            self.recent[self.last] = name
        self.calls[name] += 1
        self.last = name
        if name in self.sequence:
            n = len(self.sequence)
            start = self.pos + 1
            span = range(start, start + n) if self.cycle else range(start, n)
            nxt = next((i % n for i in span if self.sequence[i % n] == name), None)
            if nxt is not None:  # else past the end of a sequence that does not cycle: learned from here
                self.pos = nxt
        return expected is None or expected == name

    @property
    def declared(self) -> bool:
        return bool(self.sequence or self.frequency)

    def weights(self, names: Sequence[str]) -> dict[str, float]:
        """Relative call frequency: declared shares (1 for a model left out), else the declared
        sequence's counts, else the calls seen so far (each +1, so a model not yet called counts)."""
        if self.frequency:
            return {n: float(self.frequency.get(n, 1.0)) for n in names}
        declared = Counter(self.sequence)
        if declared and all(n in declared for n in names):
            return {n: float(declared[n]) for n in names}
        return {n: 1.0 + self.calls[n] for n in names}
