"""The exact planner: a CP-SAT model of one warm call, which improves on greedy and proves a bound.

The model and what its bound means: cpsat_model.py. Two of them are solved: the search's (coarse
quanta, without the disk's work followed step by step: CP-SAT finds better plans in it within the
time limit) from greedy's plan, then the prover's (fine quanta, with it: a tighter bound) for what
the search left of the time limit but its last `POLISH_SHARE` (about `BOUND_SHARE` of it, less the
prover's build). The higher of their bounds is reported.

The runtime carries out a resident set and a ring of loads at fixed offsets, not a schedule, so the
solver's resident set is turned into plans with a few ring sizes (the peak its schedule uses, the
whole rest of the budget, multiples of the largest load), each simulated; the best is returned, or
greedy's plan when none beats it (the solver's model is a relaxation: its schedule may not be one
the ring can carry out). The best plan is then polished by a local search on the simulator itself
(polish.py) for the last `POLISH_SHARE` of the time limit. The lower bound is reported either way.

OR-Tools is imported only when the planner runs, so `layerstream.plan` stays importable without it.
"""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

from ..errors import LayerstreamError
from ..units import Program
from .cost import CostModel
from .cpsat_model import CpsatModel
from .greedy import PAGE, RING_MULTIPLES, _density, plan_greedy
from .polish import polish
from .simulate import Prediction, latency, simulate
from .types import Plan, check_budget, make_plan

DEFAULT_TIME_LIMIT_S = 10.0
WARM_SHARE = 0.2  # of the search's time at most, to turn greedy's plan into its first solution
# Of the time limit (less greedy and the first model's build), about, for the bound. The search finds
# its best sets early and the polish improves on them, while the bound keeps rising for several seconds:
# at 0.3 the bound was the gap's larger part (GPT-2-large's at 25% 2.7% below the plan, against 0.5% at
# 0.65, the plans no slower: RESULTS.md, plan quality).
BOUND_SHARE = 0.65
POLISH_SHARE = 0.15  # of the time limit, for the candidates' simulation and the local search (polish.py)
MIN_POLISH_S = 0.05  # the local search's least time, when the rest ran over
FINISH_SHARE = 0.03  # of the time limit, kept after the local search: its set's ring and the prediction


class SolverError(LayerstreamError, RuntimeError):
    """The CP-SAT planner cannot run here (OR-Tools missing) or its model was refused."""


class CpsatResult(NamedTuple):
    plan: Plan  # planner "cpsat", or "greedy"/"fill" when the solver found nothing faster
    prediction: Prediction  # simulate() of `plan`
    lower_bound_s: float  # no plan under the budget has a shorter steady-state warm latency (cpsat_model.py)
    status: str  # "optimal": the model was solved; "feasible": time ran out; "unknown": no solution in time


def _cp_model():
    try:
        from ortools.sat.python import cp_model
    except ImportError as e:
        raise SolverError("the CP-SAT planner needs OR-Tools, which is not installed here: "
                          "pip install 'ortools>=9.10', or plan with the greedy planner "
                          "(--solver greedy)") from e
    return cp_model


def _plans_from(program: Program, sizes: dict[int, int], costs: CostModel, budget: int,
                resident_set: set[int], ring_need: int) -> list[Plan]:
    """Plans carrying out a resident set: rings of a few sizes, the rest of the budget filled densest first."""
    pinned = [u.uid for u in program.units if u.pinned]
    dens = _density(program, sizes, costs)
    chosen = pinned + sorted(resident_set - set(pinned), key=lambda u: -dens[u])
    out = []
    for extra in (False, True):
        resident = list(chosen)
        if extra:  # spend what the ring does not need on more resident units, densest first
            room = budget - sum(sizes[u] for u in resident) - ring_need
            for u in sorted(dens, key=lambda u: -dens[u]):
                if u not in resident and sizes[u] <= room:
                    resident.append(u)
                    room -= sizes[u]
        kept = set(resident)
        loads = [u for u in program.steps if u not in kept]
        free = budget - sum(sizes[u] for u in resident)
        if not loads:
            if free >= 0:
                out.append(make_plan(budget, resident, [], sizes, 0, "cpsat"))
            continue
        largest = max(sizes[u] for u in loads)
        need = -(-ring_need // PAGE) * PAGE
        rings = {need, free - free % PAGE} | {int(m * largest) for m in RING_MULTIPLES}
        for ring in sorted(rings):
            ring = min(ring - ring % PAGE if ring > largest else ring, free, sum(sizes[u] for u in loads))
            if largest <= ring <= free:
                out.append(make_plan(budget, resident, loads, sizes, ring, "cpsat"))
    return out


def plan_cpsat(program: Program, sizes: dict[int, int], costs: CostModel, budget: int,
               time_limit_s: float = DEFAULT_TIME_LIMIT_S, hint: tuple[Plan, Prediction] | None = None,
               workers: int | None = None, log=None) -> CpsatResult:
    """The CP-SAT plan under `budget` (never slower than greedy's), its prediction and the proven bound.

    `hint`: greedy's (plan, prediction) when the caller has it already. `workers`: CP-SAT's search
    threads (default: its own choice, every core). `log`: a callable for one line of solver progress.
    """
    check_budget(program, sizes, budget)
    if time_limit_s <= 0:
        raise ValueError(f"time_limit_s={time_limit_s}: give CP-SAT a positive time limit in seconds (e.g. 10)")
    cp_model = _cp_model()
    deadline = time.perf_counter() + time_limit_s
    greedy_plan, greedy_pred = hint or plan_greedy(program, sizes, costs, budget)
    compute = costs.compute_total_s
    if greedy_pred.latency_s <= compute * (1 + 1e-9):  # pure compute: nothing can be faster
        return CpsatResult(greedy_plan, greedy_pred, compute, "optimal")
    model = CpsatModel(cp_model, program, sizes, costs, budget, greedy_pred.latency_s)
    model.hint(program, sizes, costs, greedy_plan)
    # The shares are of what is left once greedy ran and the search model is built.
    search_s = (1 - BOUND_SHARE - POLISH_SHARE) * (deadline - time.perf_counter())

    def solver_for(seconds: float):
        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = seconds
        # Not repair_hint: with several workers OR-Tools 9.15 can abort the process with "Check failed:
        # heuristics.fixed_search != nullptr" (seen in 3 of 6 runs on a 5-unit program; never without it).
        if workers is not None:
            solver.parameters.num_workers = int(workers)
        return solver

    # The simulator's schedule is not exactly periodic nor rounded as the model is, and a partial or
    # broken hint can leave CP-SAT's search without any solution for seconds. So first complete the
    # hint into a full solution (every hinted variable fixed: a quick propagation), or when the hint
    # breaks a constraint, schedule greedy's resident set alone; then hint every variable of that
    # solution, which the search takes as its first.
    completed = model.m.clone()
    first = solver_for(max(0.05, WARM_SHARE * search_s))
    first.parameters.fix_variables_to_their_hinted_value = True
    code = first.solve(completed)
    spent = first.wall_time
    if code not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        resident = greedy_plan.resident_ids
        for u, v in model.res.items():
            completed.add(completed.get_int_var_from_proto_index(v.index) == int(u in resident))
        first = solver_for(max(0.05, WARM_SHARE * search_s))
        code = first.solve(completed)
        spent += first.wall_time
    if code in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        values = list(first.response_proto.solution)
        model.m.clear_hints()
        for i, value in enumerate(values):
            model.m.add_hint(model.m.get_int_var_from_proto_index(i), value)

    def solve(solver, which: CpsatModel, found: list[tuple[frozenset[int], int]]) -> int:
        """Solve `which`, appending every improving solution to `found` (equal in the model, not in the ring)."""

        class Collect(cp_model.CpSolverSolutionCallback):
            def on_solution_callback(self) -> None:
                found.append(which.solution(self.value, sizes, program.steps))

        code = solver.solve(which.m, Collect())
        if code == cp_model.MODEL_INVALID:
            raise SolverError(f"CP-SAT refused the model: {which.m.validate()}")
        if code == cp_model.INFEASIBLE:  # the all-serial schedule is always a solution: a bug if reached
            raise SolverError(f"CP-SAT found the model infeasible at budget {budget}; the all-serial schedule "
                              "should always fit the minimum budget: please report this with the program")
        return code

    solver = solver_for(max(0.05, search_s - spent))
    found: list[tuple[frozenset[int], int]] = []
    code = solve(solver, model, found)
    status = {cp_model.OPTIMAL: "optimal", cp_model.FEASIBLE: "feasible"}.get(code, "unknown")
    # The bound: the search model's, or the finer one's that follows the disk (cpsat_model.py), whichever
    # is higher (each holds with or without a solution); no plan beats pure compute either. The finer
    # model gets what the search left of the time limit but the polish's share; its solutions are
    # candidates too.
    prover = CpsatModel(cp_model, program, sizes, costs, budget, greedy_pred.latency_s, for_bound=True)
    proving = solver_for(max(0.05, deadline - time.perf_counter() - POLISH_SHARE * time_limit_s))
    # Its bound is the linear relaxation's unless the search branches with the LP at every node, which
    # is what lb_tree_search does (CP-SAT's default portfolio on few cores leaves it out; with
    # workers=1 there is no portfolio, and the one worker keeps CP-SAT's default search).
    proving.parameters.extra_subsolvers.append("lb_tree_search")
    proved: list[tuple[frozenset[int], int]] = []
    bound = max(compute, solver.best_objective_bound * model.q)
    try:
        solve(proving, prover, proved)
        bound = max(bound, proving.best_objective_bound * prover.q)
    except SolverError as e:  # a bug, but the search's plans and bound still stand
        warnings.warn(f"{e} (the bound model; the search model's bound is reported)", RuntimeWarning, stacklevel=2)
    if log:
        log(f"CP-SAT {status} in {solver.wall_time + proving.wall_time:.2f} s: search model latency "
            + (f"{solver.objective_value * model.q * 1e3:.3f} ms, " if status != "unknown" else "")
            + f"bound {bound * 1e3:.3f} ms")
    best = (greedy_plan, greedy_pred.latency_s)
    tried: set[tuple] = set()

    def consider(resident: set[int], need: int) -> None:
        nonlocal best
        for plan in _plans_from(program, sizes, costs, budget, resident, need):
            key = (plan.resident, plan.ring_bytes)
            if key not in tried:
                tried.add(key)
                lat = latency(program, sizes, costs, plan)
                if lat < best[1]:
                    best = (plan, lat)

    for resident, need in [*reversed(found), *reversed(proved)]:  # the search's best first: it wins ties
        consider(set(resident), need)
    # The models are coarser than the simulator, so the best of their sets is polished on the simulator
    # for the rest of the time limit (polish.py); the ring of the set it ends with is chosen as above.
    before, t = best[1], time.perf_counter()
    best = polish(program, sizes, costs, budget, *best, max(deadline - FINISH_SHARE * time_limit_s, t + MIN_POLISH_S))
    consider(set(best[0].resident_ids), 0)
    if log:
        log(f"polished on the simulator in {time.perf_counter() - t:.2f} s: {before * 1e3:.3f} -> "
            f"{best[1] * 1e3:.3f} ms")
    plan = best[0]
    pred = greedy_pred if plan is greedy_plan else simulate(program, sizes, costs, plan)
    return CpsatResult(plan, pred, bound, status)
