"""Measure a model's cost model on this machine, and keep it so planning never measures twice.

`profile` streams the model for three calls (the first learns the step order, the second times each
step with reads overlapping compute, the third times them with reads serial: pure compute) and returns
the Program, slot sizes and calibrated CostModel the planners need. `load_or_profile` keeps that as
JSON under the cache directory zoo.py uses ($LAYERSTREAM_CACHE or ~/.cache/layerstream, in
`profiles/`), keyed by everything the numbers depend on: the weight file (real path, size, mtime and
a hash of its header, so a rewritten file is measured again), the device, the input shapes and dtypes,
the unit size (it sets the unit cut, hence the steps) and the reader. A key that differs in anything
is a different file, never a stale hit.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .budget import fmt_bytes, parse_budget
from .errors import BudgetError, ModelError
from .meta import build_empty
from .plan.cost import CostModel
from .plan.types import Plan
from .units import Program, TensorRef, Unit

PROFILE_CALLS = 17  # at most: order, check (3), timed, serial, two retries of other shapes, three refits (3 each)
# Bump CACHE_VERSION when the JSON's meaning changes: older files are then measured again. 2: gather and
# block units (units carry a mode); 3: stream()'s own entries, per-unit read bytes; 4: the read tax a
# slowdown while reading, and the disk's beside compute; 5: kernel AIO topped up per root and per
# release, not per step; 6: the plan learning ended on.
CACHE_VERSION = 6


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where profiles are kept: zoo.py's cache directory, in `profiles/`. Raises OSError when there is
    none to be had ($LAYERSTREAM_CACHE unset and no home directory)."""
    try:
        root = os.environ.get("LAYERSTREAM_CACHE") or Path.home() / ".cache" / "layerstream"
    except RuntimeError as e:  # Path.home() with no $HOME and a uid not in passwd
        raise OSError(f"no cache directory: set LAYERSTREAM_CACHE ({e})") from e
    return Path(root).expanduser() / "profiles"


def weight_identity(path: str | os.PathLike) -> dict:
    """What says a weight file is the one measured: path, size, mtime, and a hash of its header."""
    real = os.path.realpath(path)
    st = os.stat(real)
    with open(real, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = f.read(min(n, 100 * 2**20))  # the header names every tensor, its dtype, shape and offset
    return {"path": real, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "header_sha256": hashlib.sha256(head + header).hexdigest()}


def inputs_signature(inputs) -> list:
    """Shapes and dtypes of a call's inputs: the step times depend on them, the values do not."""
    return [[list(x.shape), str(x.dtype)] if hasattr(x, "shape") else [repr(type(x).__name__), repr(x)]
            for x in inputs]


def device_signature(device) -> str:
    """The device as profiles key it: its name too on CUDA (an H100's times do not fit an A10)."""
    import torch
    d = torch.device(device)
    if d.type == "cuda" and torch.cuda.is_available():
        return f"{d}:{torch.cuda.get_device_name(d)}"
    return str(d)


# ---- the Program as JSON ---------------------------------------------------------------------------

def program_to_dict(program: Program) -> dict:
    return {"units": [[u.uid, u.name, list(u.roots), list(u.tensors), u.nbytes, u.pinned, u.mode] for u in program.units],
            "steps": list(program.steps),
            "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes, list(t.aliases)] for t in program.tensors]}


def program_from_dict(d: dict) -> Program:
    units = tuple(Unit(uid, name, tuple(roots), tuple(tensors), nbytes, bool(pinned), mode)
                  for uid, name, roots, tensors, nbytes, pinned, mode in d["units"])
    tensors = tuple(TensorRef(name, dtype, tuple(shape), nbytes, tuple(aliases))
                    for name, dtype, shape, nbytes, aliases in d["tensors"])
    return Program(units, tuple(d["steps"]), tensors)


@dataclass(frozen=True)
class Profile:
    """Everything planning needs about a model on this machine, and what it was measured on."""

    program: Program
    sizes: dict[int, int]  # unit id -> slot bytes in the arena
    costs: CostModel
    max_unit: int  # the unit size the program was cut with: stream with it for a plan to fit
    key: dict  # weight file identity, device, inputs, max_unit, reader, version
    measured_s: float = 0.0  # wall time the measurement took
    # The plan a stream's learning ended on (its entries only): a stream that finds the entry runs it,
    # rather than greedy's plan from these costs, which may be the plan learning measured and left.
    plan: Plan | None = None

    def to_json(self) -> str:
        return json.dumps({"key": self.key, "max_unit": self.max_unit, "measured_s": self.measured_s,
                           "costs": json.loads(self.costs.to_json()), "sizes": {str(u): s for u, s in self.sizes.items()},
                           "program": program_to_dict(self.program),
                           "plan": json.loads(self.plan.to_json()) if self.plan else None}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Profile":
        d = json.loads(text)
        plan = Plan.from_json(json.dumps(d["plan"])) if d.get("plan") else None
        return cls(program_from_dict(d["program"]), {int(u): s for u, s in d["sizes"].items()},
                   CostModel.from_json(json.dumps(d["costs"])), d["max_unit"], d["key"], d.get("measured_s", 0.0), plan)

    def summary(self) -> str:
        c = self.costs
        streamed = [u for u in self.program.steps if not self.program.units[u].pinned]
        return (f"{len(self.program.units)} units, {len(self.program.steps)} steps per call "
                f"({len(streamed)} streamable), weights {fmt_bytes(self.program.weight_bytes)}, units of at most "
                f"{fmt_bytes(self.max_unit)}; compute {c.compute_total_s * 1e3:.2f} ms per call with every weight "
                f"resident; reads {c.read_bps / 1e9:.2f} GB/s + {c.read_lat_s * 1e6:.0f} us each; compute "
                f"{1 + c.read_slowdown:.2f}x slower while the disk reads, the disk {1 + c.disk_slowdown:.2f}x "
                "slower while compute runs"
                + (f", {fmt_bytes(c.inflight_bytes)} read at most per top-up of the queue" if c.inflight_bytes else ""))


def profile(spec, weights: str | os.PathLike, budget="25%", device="cpu", max_unit: int | None = None,
            log=_stderr, refresh: bool = False):
    """(program, slot sizes, calibrated CostModel, max_unit) of `spec` streamed from `weights`.

    The first call learns the order, the next two are timed step by step, and the warm calls of the
    plan then running (greedy's, or the one kept) are fitted again, in up to two rounds (see learn.py).
    `log` gets a line before and after each call (progress, on stderr by default; None for silence). The
    stream's own profile cache is used (a model streamed alike before is not timed again) unless
    `refresh`, which times it and writes the cache over.
    """
    from .stream import stream

    log = log or (lambda msg: None)
    inputs = tuple(x.to(device) for x in spec.example_inputs())
    max_unit = effective_max_unit(spec, budget, max_unit)
    cache = "refresh" if refresh else "on"
    try:
        sm = stream(build_empty(spec.build), weights, budget=budget, device=device, max_unit=max_unit,
                    profile_cache=cache)
    except BudgetError as e:  # below the minimum for this cut: profile at the minimum instead
        log(f"  {e.minimum_bytes} bytes is the least this unit cut runs in: profiling there instead")
        sm = stream(build_empty(spec.build), weights, budget=e.minimum_bytes, device=device, max_unit=max_unit,
                    profile_cache=cache)
    doing = {"order": "learning the step order", "overlapped": "timing each step with reads overlapping compute",
             "pure": "timing each step with reads serial: pure compute",
             "check": "checking a cached cost model against a planned call",
             "settle": "the plan's first call, filling its ring",
             "refine": "fitting the slowdowns again to the plan's warm calls"}
    with sm:
        log(f"  streaming at {fmt_bytes(sm.budget_bytes)} in units of at most {fmt_bytes(sm.max_unit)}")
        for i in range(PROFILE_CALLS):  # 6-12 when measuring; a cached model is checked, maybe measured again
            stage = sm.learning
            t = time.perf_counter()
            sm(*inputs)
            log(f"  call {i + 1} ({doing[stage]}): {(time.perf_counter() - t) * 1e3:.1f} ms")
            if sm.learning == "done":
                break
        if sm.profile_note:
            log(f"  {sm.profile_note}")
        if sm.costs is None:
            raise ModelError("the timed calls took another order than the first (data-dependent control "
                             "flow), or nothing streams at this budget, so no cost model could be made; "
                             "profile at a smaller --budget, or with inputs whose control flow does not vary")
        return sm.cap.program, dict(sm.sizes), sm.costs, sm.max_unit


def effective_max_unit(spec, budget, max_unit: int | None) -> int:
    """The unit size streaming at `budget` uses: `max_unit`, or stream's default for that budget."""
    from .stream import default_max_unit, model_weight_bytes

    if max_unit:
        return int(max_unit)
    return default_max_unit(parse_budget(budget, model_weight_bytes(build_empty(spec.build))))


def profile_key(spec, weights, device, max_unit: int, reader: str = "auto") -> dict:
    return {"version": CACHE_VERSION, "model": spec.name, "weights": weight_identity(weights),
            "device": device_signature(device), "inputs": inputs_signature(spec.example_inputs()),
            "max_unit": max_unit, "reader": reader}


def cache_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(key.get("model", "model"))).strip("-") or "model"
    return cache_root() / f"{name}-{digest}.json"


def program_digest(program: Program) -> str:
    """A hash of the Program (units, steps, tensors): a profile fits only the program it timed."""
    return hashlib.sha256(json.dumps(program_to_dict(program), sort_keys=True).encode()).hexdigest()[:32]


def read_cached(key: dict, log=None) -> tuple[Profile | None, Path]:
    """(the profile cached under `key` or None, its cache file). A missing file is a miss; so is one
    that cannot be read or parsed, one made for another key, or one whose parts disagree (said so to
    `log`): it is measured again and written over. A cache never fails the caller."""
    path = cache_path(key)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, path
    except OSError as e:
        if log:
            log(f"profile cache {path} cannot be read ({e}): measuring again")
        return None, path
    try:
        prof = Profile.from_json(text)
        c = prof.costs
        consistent = (len(c.compute_s) == len(prof.program.steps)
                      and set(prof.sizes) == {u.uid for u in prof.program.units}
                      and c.read_bps > 0 and all(math.isfinite(x) and x >= 0 for x in
                                                 (*c.compute_s, c.pre_s, c.read_bps, c.read_lat_s,
                                                  c.read_slowdown, c.disk_slowdown))
                      and isinstance(c.inflight_bytes, int) and c.inflight_bytes >= 0
                      and len(c.refills) in (0, len(c.compute_s)) and all(r >= 1 for r in c.refills))
        if prof.plan is not None:  # a plan for this program's units, in its budget (PlanError: measured again)
            prof.plan.validate(prof.sizes)
            consistent = consistent and {u for u, _ in prof.plan.loads} <= set(prof.program.steps)
    except Exception as e:  # any malformed content: the file is a cache, measuring again is always right
        if log:
            log(f"profile cache {path} is unreadable ({type(e).__name__}: {e}): measuring again")
        return None, path
    if prof.key != key or not consistent:
        if log:
            log(f"profile cache {path} was made for something else: measuring again")
        return None, path
    return prof, path


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread, a moment)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def write_cached(prof: Profile) -> Path:
    """Keep `prof` under its key; written whole or not at all (a reader never sees half a file, and
    writers in several threads or processes each write their own temporary file)."""
    path = cache_path(prof.key)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as an open() would have made it (mkstemp makes 0600)
        with os.fdopen(fd, "w") as f:
            f.write(prof.to_json())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_or_profile(spec, weights, budget="25%", device="cpu", max_unit: int | None = None, *,
                    refresh: bool = False, log=_stderr) -> tuple[Profile, Path, bool]:
    """(profile, its cache file, whether it came from the cache): measured only when not cached.

    `budget` is the budget streamed while measuring; it also sets the unit size when `max_unit` is
    None (as `stream` does), so plan for a budget with the profile made at that budget.
    """
    log = log or (lambda msg: None)
    max_unit = effective_max_unit(spec, budget, max_unit)
    key = profile_key(spec, weights, device, max_unit)
    prof, path = (None, cache_path(key)) if refresh else read_cached(key, log)
    if prof is not None:
        return prof, path, True
    log(f"profiling {spec.name} on {key['device']} (six to twelve streamed calls; cached in {path.parent}) ...")
    t = time.perf_counter()
    program, sizes, costs, max_unit = profile(spec, weights, budget, device, max_unit, log=log,
                                              refresh=refresh)
    prof = Profile(program, sizes, costs, max_unit, key, time.perf_counter() - t)
    try:
        write_cached(prof)
        log(f"profile saved to {path}")
    except OSError as e:  # a read-only cache: the profile is still good for this command
        log(f"profile not cached ({e}): the next command measures again")
    return prof, path, False
