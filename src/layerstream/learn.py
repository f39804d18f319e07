"""What a streamed model's first calls teach its planner, and the profile cache that spares them.

Call 1 runs the registration-order guess; units are merged along the order it really took. Call 2 runs
that program with reads overlapping compute and is timed step by step. Call 3 runs it serially (each
read only when compute asks), so its steps time pure compute and its waits the disk alone. The simulator
is then fitted to call 2: how much slower compute ran beside reads (the read tax) and the disk beside
compute (plan/calibrate.py). That makes the cost model; the greedy planner's plan replaces the fill plan
if the simulator predicts it faster. How much compute and the disk slow each other depends on which
steps the reads run beside, so the two constants fitted to the fill plan's call mispredict a plan that
reads beside other steps (ResNet-50's greedy plans ran 30-42% faster than predicted): the faster of a
re-plan's second and third calls (its first fills the new ring: "settle"; where greedy keeps the plan,
the second and third after the serial call, which read nothing ahead) is fitted again, as the warm call
it is (the simulator's steady state; the faster, as a slow moment of the host is not the plan's), and
greedy plans once more with those costs, up to REFINE_ROUNDS times; the last round only fits, so the
plan that runs is the plan its costs were fitted to (when greedy moved on at the last round, its plan
ran 30% faster than costs fitted to another predicted), or goes back to the re-plan before it if that
one's warm calls ran faster (a re-plan chosen from a refit once ran 495-525 ms after one at 361-364),
whose warm calls after going back are fitted once more (those it was fitted to ran a few calls into the
process: ResNet-50's at 50% 129.6 ms and 156, then 106-113 after going back, 17.9% off its prediction).
After the first refit, greedy's plan is tried even if predicted up to EXPLORE_SLACK slower, as the last
round measures it against the plan before (ViT-B/16 at 50%: with costs fitted to the fill plan's calls
greedy's plan was predicted 1% faster; runs an hour apart measured it at 366 ms and the fill plan at
493). (The first call starts with nothing read ahead, as the timed call does, but the warm calls are
what a plan is chosen by and predicted for.) On CPU each step's compute is the least it took in the
serial call and the two warm calls fitted: the serial call's every loaded step waits first and runs
slower after (ViT-B/16's serial calls computed 318-337 ms in five calls where its steps took 307 with
every weight resident: one-off), and one call is one moment of the host. A warm call re-reads what the
call before read, which a host that caches the virtual disk can serve faster than the serial call
measured the disk: when no slowdown makes the simulated call that short, the disk's speed is fitted to
what explains it, if up to WARM_SPEEDUP_MAX times the serial call's does.
Calls 2 and 3 start with nothing read ahead (the previous call's end issues the next call's first
loads; they are given back), and must have the same input shapes (`key`) to be compared:
generate()'s prefill and decoding steps differ, so a serial call whose shapes differ from the timed
one's is thrown away and the next call is timed again.

The cost model is kept in the profile cache (profile.py's directory), keyed by everything its numbers
depend on: the weight files as opened (path, size, mtime, header hash), the model's class and config,
the Program after call 1 (the unit cut, hence max_unit, gathering and the order), the budget (the read
speed is calibrated against its plan), the device, torch's version and thread count and the CPU, the
call's input shapes and dtypes (and a generate() step's KV-cache length, in powers of two), the reader
and I/O backend, whether reads are verified, and whether a Session runs it. A later stream that finds
its key after a call (its first, or a later one while learning) adopts the cached costs and the plan
learning ended on (or greedy's from those costs, where it ended before a plan was fitted) at once: the
timed and the serial call are skipped. A cost model is as good as the moment it was measured on a host
whose speed moves, so the planned calls check it (the faster of the second and third): off the
prediction by more than 20%, the model is timed again and the cache written over ("refresh" does that at
once). Sessions do not check: a session re-plans its whole workload. `profile_cache="off"` neither reads
nor writes; `"refresh"` measures and writes over.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import torch

from .capture import fuse
from .checkpoint import shard_paths
from .measure import disk_read_bps
from .plan import plan_fill
from .plan.calibrate import MIN_BPS, calibrate
from .plan.cost import CostModel, costs_from_record, least_compute, with_read_bytes
from .plan.greedy import plan_greedy
from .plan.simulate import simulate
from .profile import (CACHE_VERSION, Profile, device_signature, program_digest, read_cached, weight_identity,
                      write_cached)

PROFILE_READ_BYTES = 256 * 2**20  # how much of the file to read to measure the reader's speed
CACHE_MODES = ("on", "off", "refresh")
CHECK_TOLERANCE = 0.2  # a cached cost model's prediction may be this far off a planned call ...
CHECK_MIN_MS = 5.0  # ... or this many ms (tiny models' calls are noise at the millisecond)
CHECK_CALLS = 2  # planned calls compared (the faster one: a slow moment of the host is not the model's)
CHECK_WAIT = 16  # calls of other shapes after which a cached model is kept unchecked
LEARN_TRIES = 4  # timed calls whose serial partner had other shapes, before learning gives up
REFINE_ROUNDS = 2  # re-plans whose warm calls the slowdowns are fitted to again (see the module docstring)
REFIT_CALLS = 2  # ... the faster of this many, after the re-plan's first
REPLAN_GAIN = 0.02  # a plan replaces the one running if predicted (or, at the last refit, measured) this much faster
EXPLORE_SLACK = 0.1  # ... or, after the first refit, if greedy's plan differs and is predicted at most this much slower
WARM_CALLS = 3  # ... simulated as the last of this many back-to-back calls (simulate's steady state)
WARM_SPEEDUP_MAX = 4.0  # ... whose disk may be fitted this much faster than the serial call's (a host cache)
REFIT_MIN_SHARE = 0.25  # ... if it reads at least this share of the bytes the timed call read
SERIAL_MIN_BYTES = 16 * 2**20  # a serial call that read less times the disk too coarsely: the probe's speed


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


def _config_digest(config) -> str | None:
    """A hash of the model's config where it has a stable JSON form (transformers configs, dataclasses,
    dicts); None otherwise (the program digest still covers every tensor's name and shape)."""
    import dataclasses
    try:
        if hasattr(config, "to_json_string"):
            text = config.to_json_string(use_diff=False)
        elif dataclasses.is_dataclass(config) or isinstance(config, dict):
            text = json.dumps(dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
                              sort_keys=True)
        else:
            return None
    except Exception:  # a config that does not serialise: leave it out of the key
        return None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(sm, key: tuple) -> dict:
    """The profile cache key of `sm`'s current program, called with inputs of shape key `key`: every
    thing its costs depend on (see the module docstring)."""
    model = sm.model
    return {"version": CACHE_VERSION, "kind": "session" if hasattr(sm, "session_name") else "stream",
            "model": type(model).__name__, "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": _config_digest(getattr(model, "config", None)), "weights": sm._weights_identity,
            "program": program_digest(sm.cap.program), "budget": sm.budget_bytes, "max_unit": sm.max_unit,
            "device": device_signature(sm.device), **_machine(),
            "inputs": [[k, list(shape), dtype] for k, shape, dtype in key],
            "reader": f"{sm._reader.mode}/{sm._io.kind}", "verify": sm.verify}


def after_call(sm, ex, key: tuple) -> None:
    """Learn from the call `ex` just served (shape key `key`); re-plan when the costs are known."""
    if sm._learning == "done":
        return
    _learn(sm, ex, key)
    if sm._learning == "overlapped" and sm._exec is ex:
        # The timed call is fitted as a first call (an empty ring, calibrate.py), so it must start as
        # one: the loads this call's end issued for the next are given back (after they land).
        ex.drop_prefetched()


def _learn(sm, ex, key: tuple) -> None:
    if sm._learning == "check":
        _check_cached(sm, key)
        return
    if sm._learning == "settle":
        # The plan's first call (a re-plan's, or the kept plan's after the serial call) filled its ring:
        # the next ones are warm. Each round counts its own calls of other shapes.
        sm._learning, sm._warm, sm._mismatches = "refine", [], 0
        return
    if sm._learning == "refine":
        _refine(sm, ex, key)
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
        sm._overlapped = costs_from_record(sm.cap.program, sm.cap.root_units, ex.recorded, *ex.t_call, bps,
                                           ex.unit_waits)
        sm._overlapped_s = (ex.t_call[1] - ex.t_call[0]) / 1e9
        more = sm._overlapped is not None and bool(sm.plan.loads)  # nothing streams: nothing to plan
        sm._learning = "pure" if more else "done"
        ex.set_serial(more)
        return
    if key != sm._key_overlapped:  # not comparable with the timed call: time the next one again
        ex.set_serial(False)
        sm._mismatches += 1
        if sm._mismatches >= LEARN_TRIES:  # every call another shape (generate() without a KV cache)
            sm._learning = "done"
            sm.profile_note = (f"no cost model: {LEARN_TRIES} timed calls in a row were followed by calls of "
                               "other shapes; the first plan is kept")
            return
        sm._learning = "overlapped"
        return
    sm._learning = "done"
    ex.set_serial(False)
    pure = costs_from_record(sm.cap.program, sm.cap.root_units, ex.recorded, *ex.t_call, bps, ex.unit_waits)
    if pure is None:
        return  # this call took another order (data-dependent control flow): keep the fill plan
    # What one load of each unit reads: an int8 unit its stored bytes (about a quarter of its slot), a
    # gather unit nothing ahead (its rows are read inside its forward, resident or not, so they are in
    # that step's measured compute). Read times, the tax and the calibration all use these bytes.
    reads = {u: lay.read_nbytes for u, lay in sm.layouts.items()}
    costs = with_read_bytes(replace(pure, read_bps=_alone_bps(sm, ex, pure, reads),
                                    inflight_bytes=sm._io.inflight_bytes), sm.sizes, reads)
    sm._pure_costs = costs
    sm._timed_read_bytes = _read_per_call(sm, costs)
    sm._mismatches = 0
    costs = calibrate(sm.cap.program, sm.sizes, costs, sm.plan, sm._overlapped_s, sm._overlapped.compute_total_s)
    _to_cache(sm, key, costs)
    sm._refines, sm._kept = REFINE_ROUNDS, None
    adopt(sm, costs, refine=True)
    if sm._learning == "done" and not hasattr(sm, "session_name"):  # greedy kept the plan: its warm calls
        sm._learning = "settle"  # are fitted all the same (this serial call read nothing ahead: the next settles)


def _refine(sm, ex, key: tuple) -> None:
    """Fit the slowdowns again to the faster of two warm calls of the re-plan (`ex` the second; the
    simulator's steady state: a slow moment of the host is not the plan's), with the serial call's
    disk and, on CPU, each step's least compute of the serial call and these two (cost.least_compute);
    re-plan with those costs. A call of other shapes than the serial call's is skipped (up to
    LEARN_TRIES of them: generate()'s prefill and decoding steps differ); a re-plan that reads much
    less than the timed call would fit the slowdowns on too little (and the cached costs serve other
    budgets too), so it keeps the costs it has. The last round does not re-plan: it keeps its plan,
    or goes back to the re-plan before (`sm._kept`) if that one ran faster."""
    if key != sm._key_overlapped:
        sm._mismatches += 1
        if sm._mismatches >= LEARN_TRIES:
            _stop_refining(sm, key, "calls of other shapes")
        return
    if _read_per_call(sm, sm._pure_costs) < REFIT_MIN_SHARE * sm._timed_read_bytes:
        _stop_refining(sm, key, "it reads too little to fit")
        return
    timed = costs_from_record(sm.cap.program, sm.cap.root_units, ex.recorded, *ex.t_call, sm._pure_costs.read_bps,
                              ex.unit_waits)
    if timed is None:  # another order (data-dependent control flow): keep the costs as they are
        _stop_refining(sm, key, "its call took another order")
        return
    sm._warm.append(((ex.t_call[1] - ex.t_call[0]) / 1e9, len(sm._latencies), timed))
    if len(sm._warm) < REFIT_CALLS:
        return
    sm._learning = "done"
    took, call, fitted = min(sm._warm, key=lambda w: w[0])
    sm._refines -= 1
    if sm._refines == 0 and sm._kept is not None and sm._kept[1] < took * (1 - REPLAN_GAIN):
        _back_to_kept(sm, key, f"ran slower ({took * 1e3:.1f} ms against {sm._kept[1] * 1e3:.1f})")
        sm._learning, sm._refines, sm._kept = "settle", 1, None  # a last round: it fits, does not re-plan
        return
    pure = sm._pure_costs
    if sm.device.type == "cpu":  # (on CUDA a step's host time is not its kernels': the GPU runs behind the host)
        for _, _, warm in sm._warm:
            pure = least_compute(pure, warm)
    costs = calibrate(sm.cap.program, sm.sizes, pure, sm.plan, took, fitted.compute_total_s, calls=WARM_CALLS,
                      most_bps=WARM_SPEEDUP_MAX * pure.read_bps)
    # A last round with nothing kept is the one after going back (with REFINE_ROUNDS > 1).
    back = sm._refines == 0 and sm._kept is None
    by = (f"calls 2 and 3, slowdowns fitted again to call {call} (the plan's, the faster of calls "
          f"{sm._warm[0][1]} and {sm._warm[-1][1]}{', after going back to it' if back else ''})")
    sm._kept = (sm.plan, took, costs, by)
    # The last round keeps the plan it was fitted to; the one before tries greedy's plan even if predicted
    # a little slower, as the last round measures it against this one (and goes back if it is slower).
    adopt(sm, costs, refine=True, replan=sm._refines > 0, slack=EXPLORE_SLACK)
    _to_cache(sm, key, costs, by, sm.plan if sm._learning == "done" else None)  # (with the plan learning ends on)


def _stop_refining(sm, key: tuple, why: str) -> None:
    """End learning before a round's fit. In the last round the plan running was chosen on a prediction
    (perhaps up to EXPLORE_SLACK slower) and is not measured against the plan before, which was: back
    to that one and its costs."""
    sm._learning = "done"
    if sm._refines == 1 and sm._kept is not None and sm._kept[0] != sm.plan:
        _back_to_kept(sm, key, f"was not measured ({why})")


def _back_to_kept(sm, key: tuple, why: str) -> None:
    """Run the plan of the round before (`sm._kept`) again, with the costs fitted to it, and cache both."""
    plan, _, costs, by = sm._kept
    _run_plan(sm, plan, costs)
    _to_cache(sm, key, costs, f"{by}; the plan after it {why}: back to it", plan)


def _run_plan(sm, plan, costs: CostModel) -> None:
    """Run `plan` from the next call (restarting unless it runs already), predicted with `costs`."""
    if plan != sm.plan:
        sm._restart(sm.cap, lambda: plan)
    sm.costs, sm.prediction = costs, simulate(sm.cap.program, sm.sizes, costs, plan)


def _read_per_call(sm, costs: CostModel) -> int:
    """The bytes a call of the current plan reads (what each load reads, as `costs` says)."""
    return sum(costs.unit_read_bytes(u, sm.sizes[u]) for u, _ in sm.plan.loads)


def _alone_bps(sm, ex, pure: CostModel, reads: dict[int, int]) -> float:
    """The disk's speed with compute idle, from the serial call `ex` just ran (it waited for each read in
    turn, so its time beyond its compute is reading); the probe's speed if that call read too little
    to tell."""
    loads = [u for u, _ in sm.plan.loads]
    nbytes = sum(reads[u] for u in loads)
    waited = (ex.t_call[1] - ex.t_call[0]) / 1e9 - pure.compute_total_s - len(loads) * pure.read_lat_s
    if nbytes < SERIAL_MIN_BYTES or waited <= 0:
        return pure.read_bps
    return max(MIN_BPS, nbytes / waited)


def adopt(sm, costs: CostModel, refine: bool = False, replan: bool = True, slack: float = 0.0) -> None:
    """Take `costs` as the model's cost model; run greedy's plan if the simulator predicts it faster
    (REPLAN_GAIN), or with `slack`, another plan predicted at most that share slower (and with
    `refine`, fit the costs again to its warm calls: `_refine`); not `replan`: keep the plan."""
    sm.costs = costs
    now = simulate(sm.cap.program, sm.sizes, costs, sm.plan)
    sm.prediction = now
    if hasattr(sm, "session_name") or not replan:
        return  # (a session's model: the session plans the whole workload with these costs)
    plan, pred = plan_greedy(sm.cap.program, sm.sizes, costs, sm.budget_bytes)
    other = replace(plan, planner=sm.plan.planner) != sm.plan  # another layout, not just another name
    if pred.latency_s < now.latency_s * (1 - REPLAN_GAIN) or (
            slack and other and pred.latency_s <= now.latency_s * (1 + slack)):
        sm.prediction = pred
        sm._restart(sm.cap, lambda: plan)
        if refine:
            sm._learning = "settle"


def _from_cache(sm, key: tuple) -> bool:
    """Adopt the cached cost model of this program and inputs, if there is one."""
    if sm._profile_cache != "on" or sm._weights_identity is None:
        return False
    try:
        prof, path = read_cached(cache_key(sm, key))
        if prof is None or prof.program != sm.cap.program or prof.sizes != sm.sizes:
            return False
        if prof.plan is None or hasattr(sm, "session_name"):
            adopt(sm, prof.costs)
        else:  # the plan learning ended on (greedy's plan from these costs may be one it measured and left)
            _run_plan(sm, prof.plan, prof.costs)
    except Exception as e:  # no cache directory, an entry that does not plan: learn as if the cache were off
        sm.costs = sm.prediction = None
        sm.profile_note = f"profile cache not used ({type(e).__name__}: {e})"
        return False
    sm._learning = "done" if hasattr(sm, "session_name") else "check"  # (a session re-plans as a whole)
    sm._check = {"key": _unbucketed(key), "skip": 1, "waited": 0, "ms": []}
    sm.profile_note = f"cost model from the profile cache ({path}), measured earlier: not timed again"
    return True


def _unbucketed(key: tuple) -> tuple:
    """A shape key without its KV-cache length: the check compares a generate()'s steps of any length."""
    return tuple(k for k in key if k[0] != "kv_cache_length_bits")


def _check_cached(sm, key: tuple) -> None:
    """A cached cost model is trusted once planned calls confirm it: the faster of two calls of the
    adopted shapes off the prediction by more than CHECK_TOLERANCE (and CHECK_MIN_MS) has the model
    measured again and the cache written over. Calls of other shapes are not compared; after
    CHECK_WAIT of them the model is kept unchecked."""
    c = sm._check
    if c["skip"]:  # the first call after a re-plan starts with an empty ring, whatever its shapes
        c["skip"] -= 1
        return
    if _unbucketed(key) != c["key"]:
        c["waited"] += 1
        if c["waited"] >= CHECK_WAIT:
            sm._learning = "done"
            sm.profile_note += f"; not checked ({CHECK_WAIT} calls of other shapes)"
        return
    c["ms"].append(sm._latencies[-1])
    if len(c["ms"]) < CHECK_CALLS:
        return
    predicted, measured = sm.prediction.latency_s * 1e3, min(c["ms"])
    if abs(measured - predicted) <= max(CHECK_TOLERANCE * predicted, CHECK_MIN_MS):
        sm._learning = "done"
        return
    sm.profile_note = (f"the cached cost model predicted {predicted:.1f} ms and planned calls took "
                       f"{measured:.1f} ms at best: measured again")
    sm._learning, sm._profile_cache = "overlapped", "refresh"  # time the next calls; write the cache over


def _to_cache(sm, key: tuple, costs: CostModel, by: str = "calls 2 and 3", plan=None) -> None:
    """Keep `costs` (and `plan`, where learning ends on it) in the profile cache; say so in the note."""
    if sm._profile_cache == "off" or sm._weights_identity is None:
        sm.profile_note = f"cost model measured by {by} (profile cache off" + (
            ")" if sm._profile_cache == "off" else ": a weight file could not be identified)")
        return
    try:
        path = write_cached(Profile(sm.cap.program, dict(sm.sizes), costs, sm.max_unit, cache_key(sm, key), plan=plan))
    except Exception as e:  # a read-only home: the model runs the same, the next stream measures again
        sm.profile_note = f"cost model measured by {by}; not cached ({e})"
        return
    sm.profile_note = f"cost model measured by {by}, kept in {path} for the next stream"
