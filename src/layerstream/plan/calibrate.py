"""Fit the cost model's read speed and slowdowns to a call that was really run.

A short read-speed probe reads bytes that the first calls just read, so on a machine whose host caches
the file it reports the cache's speed (seen on the GPU machine: 2.4 GB/s probed, 1.45 GB/s while
streaming a 3 GB model whose reads cycle through more than the cache holds). The timed call itself
says how fast the disk was: if it took longer than the simulator predicts at the probed speed, the
read speed that reproduces it is the one to plan with.

Compute and the disk slow each other down. The read slowdown (compute's, while the disk reads) is what
makes the timed call's compute longer than the serial call's: the slowdown at which the simulated call
computes as long as the timed one did, fitted against the time that call's reads really overlapped
its compute (not its bytes, so a plan whose reads fall in stalls is not charged for them). The disk
slowdown (the disk's, while compute runs) is what makes the timed call longer than its compute and
the disk alone explain. The fits depend on each other, so `calibrate` alternates them.
"""
from __future__ import annotations

from dataclasses import replace

from ..units import Program
from .cost import MAX_SLOWDOWN, CostModel
from .simulate import latency, simulate, timeline
from .types import Plan

MIN_BPS = 1e6  # the slowest disk a calibration believes (bytes per second)


def calibrate_read_bps(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan,
                       measured_s: float, iterations: int = 40, calls: int = 1,
                       most_bps: float | None = None) -> CostModel:
    """`costs` with the read speed at which simulating `plan` takes `measured_s` (the last of `calls`
    back-to-back calls: 1, a first call with nothing read ahead; 3, a warm call in steady state).

    Lowers the speed only, unless `most_bps`: a call faster than predicted says compute overlapped
    better than the model knows, not that the disk is faster than probed. With `most_bps` (a warm
    call of a plan that re-reads what the call before read, which a host that caches the virtual
    disk serves faster than the disk: warm calls of ResNet-50 read 98 MiB in 102-112 ms where its
    serial call measured 1.04 GB/s), a call faster than the model at any slowdown raises it to the
    speed that explains it, if one up to `most_bps` does (else compute ran faster: it stays).
    `costs` must already say what each unit reads (`with_read_bytes`): the timed call read those
    bytes, not the slots, and a speed fitted to slot bytes would be too fast by their ratio.
    """
    def predicted(bps: float) -> float:
        return simulate(program, sizes, replace(costs, read_bps=bps), plan, calls=calls).latency_s

    if not plan.loads:
        return costs
    now = predicted(costs.read_bps)
    if most_bps and most_bps > costs.read_bps and now > measured_s:
        if predicted(most_bps) > measured_s:  # no disk explains it (compute ran faster): keep the one measured
            return costs
        return replace(costs, read_bps=_slowest_enough(predicted, costs.read_bps, most_bps, measured_s, iterations))
    if now >= measured_s:
        return costs
    if predicted(MIN_BPS) < measured_s:
        return replace(costs, read_bps=MIN_BPS)
    return replace(costs, read_bps=_slowest_enough(predicted, MIN_BPS, costs.read_bps, measured_s, iterations))


def _slowest_enough(predicted, lo: float, hi: float, measured_s: float, iterations: int) -> float:
    """About the slowest read speed in [lo, hi] at which `predicted` (falling with speed) is within
    `measured_s`, given predicted(lo) > measured_s >= predicted(hi): bisected geometrically."""
    for _ in range(iterations):
        mid = (lo * hi) ** 0.5
        if predicted(mid) > measured_s:
            lo = mid
        else:
            hi = mid
    return hi


def _bisect(f, target: float, hi: float, iterations: int) -> float:
    """The x in [0, hi] at which the nondecreasing f(x) reaches `target` (0 or hi where it never does)."""
    if f(0.0) >= target:
        return 0.0
    if f(hi) <= target:
        return hi
    lo = 0.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if f(mid) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fit_read_slowdown(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan,
                      measured_compute_s: float, iterations: int = 40, calls: int = 1) -> CostModel:
    """`costs` (pure compute times) with the read slowdown at which simulating `plan` (the last of
    `calls`) computes for `measured_compute_s` in all (its pre and every step, waits for reads left out)."""
    if not plan.loads:
        return replace(costs, read_slowdown=0.0)
    x = _bisect(lambda x: timeline(program, sizes, replace(costs, read_slowdown=x), plan, calls=calls).compute_s,
                measured_compute_s, MAX_SLOWDOWN, iterations)
    return replace(costs, read_slowdown=x)


def fit_disk_slowdown(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan,
                      measured_s: float, iterations: int = 40, calls: int = 1) -> CostModel:
    """`costs` with the disk slowdown (while compute runs) at which simulating `plan` (the last of
    `calls`) takes `measured_s`."""
    if not plan.loads:
        return replace(costs, disk_slowdown=0.0)
    y = _bisect(lambda y: latency(program, sizes, replace(costs, disk_slowdown=y), plan, calls=calls),
                measured_s, MAX_SLOWDOWN, iterations)
    return replace(costs, disk_slowdown=y)


def calibrate(program: Program, sizes: dict[int, int], pure: CostModel, plan: Plan, measured_s: float,
              measured_compute_s: float, rounds: int = 4, calls: int = 1,
              most_bps: float | None = None) -> CostModel:
    """`pure` (compute times from a serial call, the disk's speed alone) fitted to a timed call of `plan`
    that took `measured_s` and computed for `measured_compute_s`: how much slower each of compute and
    the disk ran beside the other (alternately, as each depends on the other), then, if even the
    slowest disk beside compute cannot make the call that long, a slower disk alone (or, up to
    `most_bps`, a faster one if even no slowdown makes it that short: `calibrate_read_bps`). `calls`:
    1 for a call that began with nothing read ahead, 3 for a warm one (simulated in steady state)."""
    costs = pure
    for _ in range(rounds):
        costs = fit_read_slowdown(program, sizes, costs, plan, measured_compute_s, calls=calls)
        costs = fit_disk_slowdown(program, sizes, costs, plan, measured_s, calls=calls)
    other = calibrate_read_bps(program, sizes, costs, plan, measured_s, calls=calls, most_bps=most_bps)
    if other.read_bps != costs.read_bps:  # the disk overlaps compute for another time: the tax per second differs
        costs = fit_read_slowdown(program, sizes, other, plan, measured_compute_s, calls=calls)
        costs = calibrate_read_bps(program, sizes, costs, plan, measured_s, calls=calls, most_bps=most_bps)
    return costs
