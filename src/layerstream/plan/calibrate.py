"""Fit the cost model's read speed to a call that was really run.

A short read-speed probe reads bytes that the first calls just read, so on a machine whose host caches
the file it reports the cache's speed (seen on the GPU machine: 2.4 GB/s probed, 1.45 GB/s while
streaming a 3 GB model whose reads cycle through more than the cache holds). The timed call itself
says how fast the disk was: if it took longer than the simulator predicts at the probed speed, the
read speed that reproduces it is the one to plan with.
"""
from __future__ import annotations

from dataclasses import replace

from ..units import Program
from .cost import CostModel
from .simulate import simulate
from .types import Plan


def calibrate_read_bps(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan,
                       measured_s: float, iterations: int = 40) -> CostModel:
    """`costs` with the read speed at which simulating `plan` for one call (no warm-up) takes `measured_s`.

    Only ever lowers the speed: a call faster than predicted says compute overlapped better than the
    model knows, not that the disk is faster than probed. `costs` must already say what each unit
    reads (`with_read_bytes`): the timed call read those bytes, not the slots, and a speed fitted to
    slot bytes would be too fast by their ratio.
    """
    def predicted(bps: float) -> float:
        return simulate(program, sizes, replace(costs, read_bps=bps), plan, calls=1).latency_s

    if not plan.loads or predicted(costs.read_bps) >= measured_s:
        return costs
    lo, hi = 1e6, costs.read_bps  # predicted(lo) >= measured_s > predicted(hi), latency falls with speed
    if predicted(lo) < measured_s:
        return replace(costs, read_bps=lo)
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if predicted(mid) > measured_s:
            lo = mid
        else:
            hi = mid
    return replace(costs, read_bps=hi)
