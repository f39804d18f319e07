"""`layerstream session WORKLOAD.toml`: run a declared workload of several models under one budget.

```toml
budget = "25%"            # bytes ("512MB", "1.5GiB"), or a share of the largest model's weights
device = "cpu"            # optional (default cpu)
cycle = ["vit", "bert", "gpt2"]   # one cycle, repeated; or `sequence = [...]`, run once per repeat
repeats = 5               # optional (default 3)
max_unit = "16MiB"        # optional, for every model (default: an eighth of the budget)

[[model]]
name = "vit"
model = "zoo:vit-b16"     # zoo:NAME, package.module:function, or a checkpoint folder
weights = "vit.safetensors"   # optional (default: the model's seed-0 weights, made once and cached)
```
Prints the session's per-model table; `--json` writes it with the latency of every cycle, `--check`
compares each model's last output with its eager output.
"""
from __future__ import annotations

import json
import sys
import time
import tomllib
from dataclasses import dataclass

from .budget import parse_budget, parse_bytes


class WorkloadFileError(ValueError):
    """A workload file that cannot be run as written; the message says which key and how to fix it."""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model: str  # a MODEL reference, as the other commands take it
    weights: str | None
    max_unit: int | None


@dataclass(frozen=True)
class WorkloadFile:
    budget: str | int
    device: str
    order: tuple[str, ...]  # the models of one repeat, in order
    cycle: bool  # True: `cycle` (the order repeats, the session expects it to); False: `sequence`
    repeats: int
    models: tuple[ModelEntry, ...]


def load_workload(path: str) -> WorkloadFile:
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise WorkloadFileError(f"{path}: not valid TOML: {e}") from None
    entries = d.get("model")
    if not isinstance(entries, list) or not entries:
        raise WorkloadFileError(f"{path}: no models; add one [[model]] table per model, with name and model keys")
    default_unit = d.get("max_unit")
    models = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not isinstance(e.get("model"), str):
            raise WorkloadFileError(f"{path}: [[model]] number {i + 1} needs name = \"...\" and model = \"zoo:...\"")
        unit = e.get("max_unit", default_unit)
        models.append(ModelEntry(e["name"], e["model"], e.get("weights"), parse_bytes(unit) if unit else None))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise WorkloadFileError(f"{path}: model names repeat ({', '.join(names)}); give each [[model]] its own name")
    if ("cycle" in d) == ("sequence" in d):
        raise WorkloadFileError(f"{path}: give exactly one of cycle = [...] (repeated) or sequence = [...] (once "
                                "per repeat), listing model names")
    order = d.get("cycle", d.get("sequence"))
    if not isinstance(order, list) or not order or any(n not in names for n in order):
        raise WorkloadFileError(f"{path}: the order {order!r} must list model names from: {', '.join(names)}")
    if "budget" not in d:
        raise WorkloadFileError(f"{path}: no budget; add budget = \"512MB\" (bytes) or \"25%\" (of the largest model)")
    repeats = d.get("repeats", 3)
    if not isinstance(repeats, int) or repeats < 1:
        raise WorkloadFileError(f"{path}: repeats = {repeats!r}; give a positive whole number")
    return WorkloadFile(d["budget"], str(d.get("device", "cpu")), tuple(order), "cycle" in d, repeats, tuple(models))


def session_budget(budget: str | int, weight_bytes: dict[str, int]) -> int:
    """Bytes, or a share ("25%") of the largest model's weights."""
    return parse_budget(budget, max(weight_bytes.values()))


@dataclass
class Prepared:
    """A workload file's models, ready to run: built on meta, their weight files and inputs, the budget."""
    specs: dict  # name -> ModelSpec
    files: dict  # name -> weight file
    built: dict  # name -> model on meta
    weight_bytes: dict[str, int]
    budget_bytes: int
    inputs: dict  # name -> example inputs on the device


def prepare(wl: WorkloadFile, budget: str | int | None = None) -> Prepared:
    from .meta import build_empty
    from .models import resolve, weights_for
    from .stream import model_weight_bytes

    specs = {m.name: resolve(m.model) for m in wl.models}
    files = {m.name: str(weights_for(m.model, specs[m.name], m.weights)) for m in wl.models}
    built = {n: build_empty(spec.build) for n, spec in specs.items()}
    weights = {n: model_weight_bytes(m) for n, m in built.items()}
    inputs = {n: tuple(x.to(wl.device) for x in spec.example_inputs()) for n, spec in specs.items()}
    return Prepared(specs, files, built, weights, session_budget(budget or wl.budget, weights), inputs)


def open_session(wl: WorkloadFile, p: Prepared, profile_cache: str = "on"):
    """The session the workload file declares, every model added (the caller closes it). A benchmark
    passes profile_cache="refresh": it measures, whatever an earlier run left in the cache."""
    from .session import Session
    s = Session(p.budget_bytes, wl.device, workload=list(wl.order), cycle=wl.cycle)
    try:
        for m in wl.models:
            s.add(m.name, p.built[m.name], p.files[m.name], max_unit=m.max_unit, profile_cache=profile_cache)
    except BaseException:
        s.close()
        raise
    return s


def run_cycles(call, order, cycles: int, log=None, before=None, after=None):
    """Call `call(name)` for each name of `order`, `cycles` times; the timings the session and bench report.

    Returns (each model's last output, every cycle's ms, every call's ms per model). The `before` and
    `after` hooks (measurement, page-cache eviction) are not timed: a cycle is the sum of its calls.
    """
    outs, cycles_ms, calls_ms = {}, [], {n: [] for n in order}
    for r in range(cycles):
        cycle = 0.0
        for name in order:
            if before:
                before(name)
            t = time.perf_counter()
            outs[name] = call(name)
            calls_ms[name].append((time.perf_counter() - t) * 1e3)
            cycle += calls_ms[name][-1]
            if after:
                after(name)
        cycles_ms.append(cycle)
        if log:
            log(f"repeat {r + 1}/{cycles}: {cycles_ms[-1]:.1f} ms")
    return outs, cycles_ms, calls_ms


def eager_check(spec, weights: str, inputs, out, device: str, timed: int = 0):
    """The model loaded eagerly (alone: the models need not fit together) and called on `inputs`:
    (its output equals `out`, its output, median ms of `timed` warm calls after one, or None)."""
    import statistics

    import torch

    from .eager import load_eager
    from .meta import build_empty
    from .outputs import outputs_equal, tensors_of
    model = load_eager(build_empty(spec.build), weights).to(device)
    ms = []
    with torch.no_grad():
        ref = model(*inputs)
        for _ in range(timed):
            t = time.perf_counter()
            model(*inputs)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            ms.append((time.perf_counter() - t) * 1e3)
    equal = outputs_equal(tensors_of(out), tensors_of(ref), exact=device == "cpu")
    return equal, ref, statistics.median(ms) if ms else None


def cmd_session(a) -> int:
    wl = load_workload(a.workload)
    p = prepare(wl, a.budget)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    with open_session(wl, p) as s:
        outs, cycles_ms, _ = run_cycles(lambda n: s.run(n, *p.inputs[n]), wl.order, a.repeats or wl.repeats, log)
        report = s.report()
    print(report)
    equal = {}
    if a.check:
        for n in outs:
            equal[n] = eager_check(p.specs[n], p.files[n], p.inputs[n], outs[n], wl.device)[0]
            print(f"{n}: outputs equal to eager: {'yes' if equal[n] else 'NO'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workload_file": a.workload, "order": list(wl.order), "cycle": wl.cycle, "device": wl.device,
                       "cycles_ms": cycles_ms, "outputs_equal": equal or None, **report.as_dict()}, f, indent=1)
    return 0 if all(equal.values()) else 1
