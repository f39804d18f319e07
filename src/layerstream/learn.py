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
depend on: the weight files as opened (path, size, mtime, header hash), the model's class and config,
the Program after call 1 (the unit cut, hence max_unit, gathering and the order), the budget (the
read speed is calibrated against its plan), the device, torch's version and thread count and the CPU,
the call's input shapes and dtypes (and a generate() step's KV-cache length, in powers of two), the
reader and I/O backend, whether reads are verified, and whether a Session runs it. A later stream
that finds its key after a call (its first, or a later one while learning) adopts the cached costs
and plans at once: the timed and the serial call are skipped. A cost model is as good as the moment
it was measured on a host whose speed moves, so the second planned call checks it: off the prediction
by more than 20%, the model is timed again and the cache written over ("refresh" does that at once). `profile_cache="off"`
neither reads nor writes; `"refresh"` measures and writes over.
"""
from __future__ import annotations

import hashlib
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
CHECK_TOLERANCE = 0.2  # a cached cost model's prediction may be this far off a planned call ...
CHECK_MIN_MS = 5.0  # ... or this many ms (tiny models' calls are noise at the millisecond)


def check_cache_mode(mode) -> str:
    if isinstance(mode, bool) or mode is None:
        return "on" if mode else "off"
    if not isinstance(mode, str) or mode not in CACHE_MODES:
        raise ValueError(f"profile_cache={mode!r}: use 'on' (read and write the profile cache), "
                         "'off' (neither) or 'refresh' (measure again and write over)")
    return mode


def weights_identity(index) -> list[dict] | None:
    """The identity of every file `index` reads (taken when the model opens them, so a file replaced
    later is not mistaken for the one timed), or None when a file cannot be stat'ed."""
    try:
        return [weight_identity(p) for p in shard_paths(index)]
    except OSError:
        return None


def _machine() -> dict:
    """What the compute times depend on beyond the device: torch's build and, on a CPU, its model."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu}


def cache_key(sm, key: tuple) -> dict:
    """The profile cache key of `sm`'s current program, called with inputs of shape key `key`: every
    thing its costs depend on (see the module docstring)."""
    model = sm.model
    config = getattr(model, "config", None)
    config = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    return {"version": CACHE_VERSION, "kind": "session" if hasattr(sm, "session_name") else "stream",
            "model": type(model).__name__, "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": hashlib.sha256(config.encode()).hexdigest()[:16], "weights": sm._weights_identity,
            "program": program_digest(sm.cap.program), "budget": sm.budget_bytes, "max_unit": sm.max_unit,
            "device": device_signature(sm.device), **_machine(),
            "inputs": [[k, list(shape), dtype] for k, shape, dtype in key],
            "reader": f"{sm._reader.mode}/{sm._io.kind}", "verify": sm.verify}


def after_call(sm, ex, key: tuple) -> None:
    """Learn from the call `ex` just served (shape key `key`); re-plan when the costs are known."""
    if sm._learning == "done":
        return
    if sm._learning == "check":
        _check_cached(sm, key)
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
    sm.prediction = now
    if hasattr(sm, "session_name"):
        return  # a session's model: the session plans the whole workload with these costs
    plan, pred = plan_greedy(sm.cap.program, sm.sizes, costs, sm.budget_bytes)
    if pred.latency_s < now.latency_s * 0.98:
        sm.prediction = pred
        sm._restart(sm.cap, lambda: plan)


def _from_cache(sm, key: tuple) -> bool:
    """Adopt the cached cost model of this program and inputs, if there is one."""
    if sm._profile_cache != "on" or sm._weights_identity is None:
        return False
    try:
        prof, path = read_cached(cache_key(sm, key))
    except OSError as e:  # no cache directory to be had: learn as if it were off
        sm.profile_note = f"profile cache unavailable ({e})"
        return False
    if prof is None or prof.program != sm.cap.program or prof.sizes != sm.sizes:
        return False
    sm._learning = "done" if hasattr(sm, "session_name") else "check"
    sm._check = (key, 1)  # compare the second planned call of these shapes with the prediction
    sm.profile_note = f"cost model from the profile cache ({path}), measured earlier: not timed again"
    adopt(sm, prof.costs)
    return True


def _check_cached(sm, key: tuple) -> None:
    """A cached cost model is trusted once a planned call confirms it: one whose latency is off the
    prediction by more than CHECK_TOLERANCE (and CHECK_MIN_MS) is measured again and written over."""
    want, skip = sm._check
    if key != want:
        return  # not comparable: wait for a call of the shapes the prediction is for
    if skip:
        sm._check = (want, skip - 1)  # the first call after a re-plan starts with an empty ring
        return
    predicted, measured = sm.prediction.latency_s * 1e3, sm._latencies[-1]
    if abs(measured - predicted) <= max(CHECK_TOLERANCE * predicted, CHECK_MIN_MS):
        sm._learning = "done"
        return
    sm.profile_note = (f"the cached cost model predicted {predicted:.1f} ms and a planned call took "
                       f"{measured:.1f} ms: measured again")
    sm._learning, sm._profile_cache = "overlapped", "refresh"  # time the next calls; write the cache over


def _to_cache(sm, key: tuple, costs: CostModel) -> None:
    if sm._profile_cache == "off" or sm._weights_identity is None:
        sm.profile_note = "cost model measured by calls 2 and 3 (profile cache off" + (
            ")" if sm._profile_cache == "off" else ": a weight file could not be identified)")
        return
    try:
        path = write_cached(Profile(sm.cap.program, dict(sm.sizes), costs, sm.max_unit, cache_key(sm, key)))
    except OSError as e:  # a read-only home: the model runs the same, the next stream measures again
        sm.profile_note = f"cost model measured by calls 2 and 3; not cached ({e})"
        return
    sm.profile_note = f"cost model measured by calls 2 and 3, kept in {path} for the next stream"
