"""The memory-latency frontier: the best predicted latency at every budget, and where the knee is.

Demand Layering found its buffer size by trial runs; here the frontier is swept on the simulator with
the profile's cost model, so a user sees the whole trade-off before picking a budget; the knee may then
be found again with costs fitted to calls at it (`with_knee`; knee.py streams those calls).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..units import Program
from .cost import CostModel
from .greedy import plan_greedy, plan_greedy_many
from .types import min_budget

KNEE = 1.05  # "near-zero delay": predicted latency within 5% of pure compute (Demand Layering's point)


@dataclass(frozen=True)
class Point:
    budget_bytes: int
    arena_bytes: int
    predicted_ms: float
    # A warm call's physical bound: max(compute, streamed bytes / read speed). Not plus the first load's
    # read, as a cold call's is: in steady state it reads during the call before (as `bench` bounds warm runs).
    bound_ms: float
    streamed_bytes: int  # read from the file per call (int8 and gather units read less than their slots)
    planner: str
    measured_ms: float | None = None
    eager_ms: float | None = None  # measured in the same run, each call beside one of measured_ms's
    fitted_at: int | None = None  # predicted with costs fitted to calls at this budget (None: the profile's)


@dataclass(frozen=True)
class Frontier:
    points: tuple[Point, ...]
    compute_ms: float  # every weight resident: the latency to approach
    weight_bytes: int  # slot bytes of every unit a call uses
    read_bps: float
    # Smallest budget predicted within KNEE x compute (a point of its own), by the costs of its point's
    # `fitted_at` where set (with_knee; then its compute is knee_compute_ms), else by the profile's.
    knee_bytes: int | None
    eager_ms: float | None = None  # measured: every weight loaded, warm (`tradeoff --measure`)
    knee_compute_ms: float | None = None  # the knee's line is KNEE x this (its costs' compute); None: compute_ms
    profile_knee_bytes: int | None = None  # where the profile's costs put the knee, when with_knee moved it

    @property
    def knee_point(self) -> Point | None:
        return next((p for p in self.points if p.budget_bytes == self.knee_bytes), None)

    def as_dict(self) -> dict:
        return asdict(self)


def sweep(program: Program, sizes: dict[int, int], costs: CostModel, steps: int = 16) -> Frontier:
    """Plan at `steps` budgets spaced evenly (in log scale) from the minimum to the whole model, plus
    the knee: the smallest budget predicted within KNEE x compute, found by bisection between them."""
    lo, _ = min_budget(program, sizes)
    used = set(program.steps) | {u.uid for u in program.units if u.pinned}
    hi_bytes = sum(sizes[u] for u in used)
    budgets = sorted({int(lo * (hi_bytes / lo) ** (i / (steps - 1))) for i in range(steps)} | {lo, hi_bytes})
    compute_s = costs.compute_total_s
    within = KNEE * compute_s

    def point(b: int, plan, pred) -> Point:
        streamed = sum(costs.unit_read_bytes(u, sizes[u]) for u, _ in plan.loads)
        bound = max(compute_s, streamed / costs.read_bps)
        return Point(b, plan.arena_bytes, pred.latency_s * 1e3, bound * 1e3, streamed, plan.planner)

    # One walk up greedy's budget grid answers every budget (greedy is monotone in the budget, so the
    # frontier never rises).
    points = [point(b, *ans) for b, ans in zip(budgets, plan_greedy_many(program, sizes, costs, budgets))]
    k = next((i for i, p in enumerate(points) if p.predicted_ms <= within * 1e3), None)
    if k:  # the knee lies between two budgets of the sweep: find it (to 0.5%) by bisection, a point of its own
        slow, fast, best = points[k - 1].budget_bytes, points[k].budget_bytes, None
        while fast - slow > max(4096, fast // 200):
            mid = (slow + fast) // 2
            plan, pred = plan_greedy(program, sizes, costs, mid)
            if pred.latency_s <= within:
                fast, best = mid, point(mid, plan, pred)
            else:
                slow = mid
        if best is not None:
            points.insert(k, best)
    knee = points[k].budget_bytes if k is not None else None
    return Frontier(tuple(points), compute_s * 1e3, hi_bytes, costs.read_bps, knee)


def with_knee(frontier: Frontier, found: Frontier, fitted_at: int) -> Frontier:
    """`frontier` (the profile's) with the knee `found` by a sweep with costs fitted to calls at
    `fitted_at` bytes: its knee point (predicted with those costs, `fitted_at` on it) replaces any
    point of that budget, and it is the knee. Every other point stays the profile's; `frontier` as it
    is when `found` has no knee."""
    if found.knee_bytes is None:
        return frontier
    knee = replace(found.knee_point, fitted_at=fitted_at)
    points = sorted([p for p in frontier.points if p.budget_bytes != knee.budget_bytes] + [knee],
                    key=lambda p: p.budget_bytes)
    return replace(frontier, points=tuple(points), knee_bytes=knee.budget_bytes, knee_compute_ms=found.compute_ms,
                   profile_knee_bytes=frontier.knee_bytes)
