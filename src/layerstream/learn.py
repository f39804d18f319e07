"""What a streamed model's first calls teach its planner, and the profile cache that spares them.

Call 1 runs the registration-order guess; units are merged along the order it really took. Call 2
runs that program with reads overlapping compute and is timed step by step. Call 3 runs it serially
(each read only when compute asks), so its steps time pure compute; the difference is the compute
that reading costs (the read tax). With the reader's speed, calibrated so the simulator reproduces
call 2, that makes the cost model; the greedy planner's plan replaces the fill plan if the simulator
predicts it faster. Calls 2 and 3 must have the same input shapes (`key`) to be compared:
generate()'s prefill and decoding steps differ, so a serial call whose shapes differ from the timed
one's is thrown away and the next call is timed again.

The cost model is kept in the profile cache (profile.py's directory), keyed by everything its numbers
depend on: the weight files (path, size, mtime, header hash), the Program after call 1 (so the unit
cut, hence max_unit, budget-dependent gathering and the order), the device, torch's thread count,
the call's input shapes and dtypes, and the reader. A later stream of the same model and file that
finds its key after a call (its first, or a later one while learning) adopts the cached costs and
plans at once: the timed and the serial call (the slowest of all) are skipped. `profile_cache="off"`
neither reads nor writes; `"refresh"` measures and writes over.
"""
from __future__ import annotations

import os

import torch

from .capture import fuse
from .checkpoint import shard_paths
from .measure import disk_read_bps
from .plan import plan_fill
from .plan.calibrate import calibrate_read_bps
from .plan.cost import CostModel, costs_from_record, with_read_bytes, with_read_tax
from .plan.greedy import plan_greedy
from .plan.simulate import simulate
from .profile import (CACHE_VERSION, Profile, device_signature, program_digest, read_cached, weight_identity,
                      write_cached)

PROFILE_READ_BYTES = 256 * 2**20  # how much of the file to read to measure the reader's speed
CACHE_MODES = ("on", "off", "refresh")


def check_cache_mode(mode) -> str:
    mode = {True: "on", False: "off", None: "off"}.get(mode, mode)
    if mode not in CACHE_MODES:
        raise ValueError(f"profile_cache={mode!r}: use 'on' (read and write the profile cache), "
                         "'off' (neither) or 'refresh' (measure again and write over)")
    return mode


def cache_key(sm, key: tuple) -> dict:
    """The profile cache key of `sm`'s current program, called with inputs of shape key `key`."""
    return {"version": CACHE_VERSION, "kind": "stream", "model": type(sm.model).__name__,
            "weights": [weight_identity(p) for p in shard_paths(sm.index)],
            "program": program_digest(sm.cap.program), "device": device_signature(sm.device),
            "threads": torch.get_num_threads(), "inputs": [[k, list(shape), dtype] for k, shape, dtype in key],
            "max_unit": sm.max_unit, "reader": sm._reader_mode}


def after_call(sm, ex, key: tuple) -> None:
    """Learn from the call `ex` just served (shape key `key`); re-plan when the costs are known."""
    if sm._learning == "done":
        return
    if sm._learning == "order":
        sm._learning = "overlapped"
        cap = fuse(sm.cap, [p for p, _, _ in ex.recorded], sm.max_unit, sm.index)
        if cap.program != sm.cap.program:
            sm._restart(cap, lambda: plan_fill(cap.program, sm.sizes, sm.budget_bytes))
        _from_cache(sm, key)
        return
    bps = sm._profile_bps
    if sm._learning == "overlapped":
        if _from_cache(sm, key):
            return
        if not bps:  # the largest shard stands for a folder's disk: they lie side by side
            big = max(shard_paths(sm.index), key=os.path.getsize)
            sm._profile_bps = bps = disk_read_bps(big, sm._reader_mode, sm._io.kind,
                                                  max_bytes=PROFILE_READ_BYTES)[0]
        sm._key_overlapped = key
        sm._overlapped = costs_from_record(sm.cap.program, sm.cap.root_units, ex.recorded, *ex.t_call, bps)
        sm._overlapped_s = (ex.t_call[1] - ex.t_call[0]) / 1e9
        more = sm._overlapped is not None and bool(sm.plan.loads)  # nothing streams: nothing to plan
        sm._learning = "pure" if more else "done"
        ex.set_serial(more)
        return
    if key != sm._key_overlapped:  # not comparable with the timed call: time the next one again
        sm._learning = "overlapped"
        ex.set_serial(False)
        return
    sm._learning = "done"
    ex.set_serial(False)
    pure = costs_from_record(sm.cap.program, sm.cap.root_units, ex.recorded, *ex.t_call, bps)
    if pure is None:
        return  # this call took another order (data-dependent control flow): keep the fill plan
    # What one load of each unit reads: an int8 unit its stored bytes (about a quarter of its slot), a
    # gather unit nothing ahead (its rows are read inside its forward, resident or not, so they are in
    # that step's measured compute). Read times, the tax and the calibration all use these bytes.
    reads = {u: lay.read_nbytes for u, lay in sm.layouts.items()}
    streamed = sum(reads[u] for u, _ in sm.plan.loads)  # the tax is per byte read
    costs = with_read_bytes(with_read_tax(sm._overlapped, pure, streamed), sm.sizes, reads)
    costs = calibrate_read_bps(sm.cap.program, sm.sizes, costs, sm.plan, sm._overlapped_s)
    _to_cache(sm, key, costs)
    adopt(sm, costs)


def adopt(sm, costs: CostModel) -> None:
    """Take `costs` as the model's cost model; run greedy's plan if the simulator predicts it faster."""
    sm.costs = costs
    now = simulate(sm.cap.program, sm.sizes, costs, sm.plan)
    plan, pred = plan_greedy(sm.cap.program, sm.sizes, costs, sm.budget_bytes)
    sm.prediction = now
    if pred.latency_s < now.latency_s * 0.98:
        sm.prediction = pred
        sm._restart(sm.cap, lambda: plan)


def _from_cache(sm, key: tuple) -> bool:
    """Adopt the cached cost model of this program and inputs, if there is one."""
    if sm._profile_cache != "on":
        return False
    prof, path = read_cached(cache_key(sm, key))
    if prof is None or prof.program != sm.cap.program or prof.sizes != sm.sizes:
        return False
    sm._learning = "done"
    sm.profile_note = f"cost model from the profile cache ({path}), measured earlier: not timed again"
    adopt(sm, prof.costs)
    return True


def _to_cache(sm, key: tuple, costs: CostModel) -> None:
    if sm._profile_cache == "off":
        sm.profile_note = "cost model measured by calls 2 and 3 (profile cache off)"
        return
    prof = Profile(sm.cap.program, dict(sm.sizes), costs, sm.max_unit, cache_key(sm, key))
    try:
        path = write_cached(prof)
    except OSError as e:  # a read-only home: the model runs the same, the next stream measures again
        sm.profile_note = f"cost model measured by calls 2 and 3; not cached ({e})"
        return
    sm.profile_note = f"cost model measured by calls 2 and 3, kept in {path} for the next stream"
