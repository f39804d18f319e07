"""Local search on the simulator: the CP-SAT planner's last step (cpsat.py).

CP-SAT searches a model coarser than the simulator (it leaves out the disk's work step by step: see
cpsat_model.py), so its best resident set is seldom the simulator's best among the sets near it. From
the best plan found, moves that change the resident set are simulated: a unit in or out, two units
swapped, or a unit in with the least dense residents out until the largest load fits beside them. The
ring is the whole rest of the budget or the current plan's ring, whichever simulates faster. The first
faster move is taken; at a local optimum a few random moves from the best plan restart the climb
(iterated local search), until the deadline or until STALE_KICKS restarts in a row found nothing.
Each simulation takes well under a millisecond on the zoo's programs, so a second tries thousands of
sets.
"""
from __future__ import annotations

import random
import time

from ..units import Program
from .cost import CostModel
from .greedy import PAGE, _density
from .simulate import latency
from .types import Plan, make_plan

KICK = 3  # random moves that restart the climb from the best plan at a local optimum
STALE_KICKS = 20  # restarts in a row that found nothing faster, after which the search stops early


def polish(program: Program, sizes: dict[int, int], costs: CostModel, budget: int, plan: Plan, latency_s: float,
           deadline: float, seed: int = 0) -> tuple[Plan, float]:
    """The fastest plan found near `plan` (simulated at `latency_s`) by `deadline` (time.perf_counter()),
    with its simulated latency; `plan` itself if none is faster. Seeded, so a run is repeatable up to
    where the deadline cuts it."""
    rnd = random.Random(seed)
    pinned = [u.uid for u in program.units if u.pinned]
    pinned_bytes = sum(sizes[u] for u in pinned)
    units = sorted({u for u in program.steps} - set(pinned))
    dens = _density(program, sizes, costs)

    seen: dict[tuple[frozenset[int], int], tuple[Plan, float] | None] = {}

    def evaluate(kept: frozenset[int], ring_now: int) -> tuple[Plan, float] | None:
        """The faster of `kept`'s plans (the whole rest as ring, or `ring_now`), each set simulated once
        (the climbs after each kick pass the same sets again)."""
        if (kept, ring_now) not in seen:
            seen[kept, ring_now] = simulated(kept, ring_now)
        return seen[kept, ring_now]

    def simulated(kept: frozenset[int], ring_now: int) -> tuple[Plan, float] | None:
        resident = pinned + sorted(kept)
        free = budget - pinned_bytes - sum(sizes[u] for u in kept)
        loads = [u for u in program.steps if u not in kept and u not in pinned]
        if free < 0:
            return None
        if not loads:
            done = make_plan(budget, resident, [], sizes, 0, "cpsat")
            return done, latency(program, sizes, costs, done)
        largest, total = max(sizes[u] for u in loads), sum(sizes[u] for u in loads)
        best = None
        for ring in {free - free % PAGE, min(ring_now, free - free % PAGE)}:
            ring = min(ring, total)
            if ring >= largest:
                p = make_plan(budget, resident, loads, sizes, ring, "cpsat")
                lat = latency(program, sizes, costs, p)
                if best is None or lat < best[1]:
                    best = (p, lat)
        return best

    def fitted(kept: set[int], keep: int) -> frozenset[int]:
        """`kept` less its least dense units (never `keep`) until the largest load fits beside them."""
        while True:
            loads = [sizes[u] for u in units if u not in kept]
            if pinned_bytes + sum(sizes[u] for u in kept) + max(loads, default=0) <= budget:
                return frozenset(kept)
            drop = min((u for u in kept if u != keep), key=lambda u: dens[u], default=None)
            if drop is None:
                return frozenset(kept)
            kept = kept - {drop}

    def neighbours(kept: frozenset[int]):
        """The moves from `kept`, made as they are tried (a thousand units make half a million swaps):
        flips and insertions in random order, then swaps, one shuffled diagonal of pairs at a time."""
        inside, out = sorted(kept), [u for u in units if u not in kept]
        rnd.shuffle(inside)
        rnd.shuffle(out)
        few = [(u,) for u in units] + [("in", v) for v in out]
        rnd.shuffle(few)
        for move in few:
            yield kept ^ {move[0]} if len(move) == 1 else fitted(set(kept) | {move[1]}, move[1])
        for shift in range(len(out)):
            for i, u in enumerate(inside):
                yield kept ^ {u, out[(i + shift) % len(out)]}

    best = cur = (plan, latency_s)
    if not units:  # every unit pinned: nothing to move
        return best
    kept = frozenset(plan.resident_ids) - set(pinned)
    stale = 0
    while time.perf_counter() < deadline and stale < STALE_KICKS:
        climbing = True
        while climbing and time.perf_counter() < deadline:
            climbing = False
            for nxt in neighbours(kept):
                if time.perf_counter() >= deadline:
                    break
                found = evaluate(nxt, cur[0].ring_bytes)
                if found and found[1] < cur[1] * (1 - 1e-9):
                    cur, kept, climbing = found, nxt, True
                    break
        if cur[1] < best[1]:
            best, stale = cur, 0
        else:
            stale += 1
        kept = frozenset(best[0].resident_ids) - set(pinned)  # a kick: a few random moves from the best
        for _ in range(KICK):
            out = [u for u in units if u not in kept]
            if kept and out and rnd.random() < 0.5:
                kept = kept ^ {rnd.choice(sorted(kept)), rnd.choice(out)}
            else:
                kept = kept ^ {rnd.choice(units)}
        cur = evaluate(kept, best[0].ring_bytes) or best
        if cur is best:
            kept = frozenset(best[0].resident_ids) - set(pinned)
        elif cur[1] < best[1]:  # the kick itself found a faster plan
            best, stale = cur, 0
    return best
