"""The bound model's cuts that follow the disk's work through one call (cpsat_model.py is the model).

They hold for every schedule the runtime could follow, so they only raise the bound: CP-SAT's
linear relaxation of the model alone lets the disk read beside every compute at once and a load
read in part hold part of its slot.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..units import Program
from .cost import CostModel

if TYPE_CHECKING:
    from .cpsat_model import CpsatModel

WHOLE_LOADS = 8  # per step, the next steps whose loads' beginning the bound model follows (`_add_whole_loads`)
COVER_LOADS = 40  # or up to this many, when their slots exceed the budget (then the cut needs no way out)


def add_flow(model: CpsatModel, program: Program, sizes: dict[int, int], costs: CostModel, cap: int, quanta,
             ring_terms) -> None:
    """Redundant cuts that follow the disk's work through the call, interval by interval.

    The call is cut at its step starts into intervals: the pre, then each step's compute with the
    wait before the next. D[j] is the disk's work (seconds alone) done at interval j's start on
    this call's loads and later ones, counted from this call's first load (so D[0] is what the
    previous call read ahead). In interval j the disk works `w` beside its compute (at most
    `read_allowance`) and `g` while compute waits; the compute then lasts its pure length plus
    x (1 + y) / (1 + x) per second of disk work beside it (compute slowed 1 + x while the disk
    reads, the disk 1 + y while compute runs: the simulator's rules). Every streamed step's loads
    are read by its start; the loads read ahead of the step before fit the ring (`CpsatModel._ring_terms`,
    with each step's own slot held during its compute); in a period the disk does one call's work.
    Integers are floors of the real values (with w at most the real w's floor plus one, which the
    read-ahead cuts' + 1 allows for), so each interval's cut gives up 2 quanta and a little more.
    """
    m, steps, q = model.m, program.steps, model.q
    if not model.streamed_steps or costs.read_bps <= 0:
        return
    x, y = costs.read_slowdown, costs.disk_slowdown
    scale = 1000
    per_work = math.floor(scale * x * (1 + y) / (1 + x))  # extra compute per disk work beside it, scaled
    slack = 2 * scale + math.ceil(scale * x * (1 + y) / (1 + x))
    durs = [quanta(costs.pre_s)] + model.dur
    allow = model.read_allowance(costs, (costs.pre_s,)) + model.read_allowance(costs)
    points = [0] + model.c + [model.T]  # interval j runs from points[j] to points[j + 1]
    top = 4 * model.H
    D = [m.new_int_var(0, top, f"D{j}") for j in range(len(points))]
    rd = {i: costs.read_s(model.read[steps[i]]) / q for i in model.streamed_steps}
    need_up = [0] * len(steps)  # reads of the loads of steps 0..i, in quanta, rounded up
    dn = up = 0
    for i, u in enumerate(steps):
        if u in model.res:
            dn = dn + int(rd[i]) * (1 - model.res[u])
            up = up + math.ceil(rd[i]) * (1 - model.res[u])
            m.add(D[i + 1] >= dn)  # step i's load is in when it starts
        need_up[i] = up
    m.add(D[-1] - D[0] >= dn)  # a period's work: this call's reads
    if ring_terms is not None:
        w_of, held, ring, lat = ring_terms
    for j, dur in enumerate(durs):
        w = m.new_int_var(0, allow[j], f"w{j}")
        g = m.new_int_var(0, top, f"g{j}")
        m.add(D[j + 1] == D[j] + w + g)
        m.add(scale * (points[j + 1] - points[j]) >= scale * dur + per_work * w + scale * g - slack)
        if ring_terms is None:
            continue
        before = need_up[j - 2] if j >= 2 else 0  # loads of the steps before this interval's step
        step = j - 1  # this interval's step (-1: the pre)
        mine = model.own_slot(w_of, steps, step)
        m.add(D[j] - before <= ring - held + lat)  # at its start
        ahead = D[j] + w - (need_up[step] if step >= 0 else 0)  # read beyond its step, as its compute ends
        m.add(ahead <= ring - held - mine + lat + 1)
        _add_whole_loads(model, program, sizes, costs, cap, step, ahead, ring + lat + 1)
    if ring_terms is not None:
        m.add(D[-1] - need_up[-1] <= ring - held + lat)


def _add_whole_loads(model: CpsatModel, program: Program, sizes: dict[int, int], costs: CostModel, cap: int,
                     step: int, ahead, most: int) -> None:
    """As step `step`'s compute ends, what was read beyond it (`ahead`, + 1 for rounding) is of whole loads.

    A load begun holds its whole slot, so what the disk did ahead is at most the reads of the loads
    begun, in order, whose slots fit beside the resident units and the step's own. Per next step
    (into the next call's), `passed`: the disk has begun every load up to it (in order: each implies
    the one before), so a streamed one is `begun`. The steps followed run until their units' slots
    (other than the step's own) exceed the budget (at most `COVER_LOADS` of them): no schedule
    passes them all, since each is then resident or begun and held at once. When no such run is
    that short, the next `WHOLE_LOADS` are followed, and past the last of them only the fluid cut
    holds (`most`: the whole ring's), so the cut gives way when it is passed.
    """
    m, steps, n = model.m, program.steps, len(program.steps)
    after = [i for i in model.streamed_steps if i > step] + [i + n for i in model.streamed_steps]
    window, seen, total = [], {steps[step]} if step >= 0 else set(), 0
    for i in after[:COVER_LOADS]:
        window.append(i)
        if steps[i % n] not in seen:
            seen.add(steps[i % n])
            total += sizes[steps[i % n]]
            if total > cap:
                break
    covered = total > cap
    begun, passed = [], None
    for i in window if covered else after[:WHOLE_LOADS]:
        u = steps[i % n]
        z, p = m.new_bool_var(f"begun{step}_{i}"), m.new_bool_var(f"passed{step}_{i}")
        m.add(z <= 1 - model.res[u])  # (resident: no load)
        m.add(z <= p)
        m.add(z >= p - model.res[u])
        if passed is not None:
            m.add(p <= passed)
        begun.append((z, u))
        passed = p
    if not begun:
        return
    mine = model.own_slot(sizes, steps, step)
    m.add(sum(sizes[u] * z for z, u in begun) + model.resident_bytes + mine <= cap)
    reads = sum(math.ceil(costs.read_s(model.read[u]) / model.q) * z for z, u in begun)
    m.add(ahead <= reads + 1 + (0 if covered else most * passed))
