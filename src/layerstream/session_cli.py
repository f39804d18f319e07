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


def cmd_session(a) -> int:
    import torch

    from .meta import build_empty
    from .models import resolve, weights_for
    from .session import Session
    from .stream import model_weight_bytes

    wl = load_workload(a.workload)
    specs = {m.name: resolve(m.model) for m in wl.models}
    files = {m.name: weights_for(m.model, specs[m.name], m.weights) for m in wl.models}
    built = {n: build_empty(spec.build) for n, spec in specs.items()}
    budget = session_budget(a.budget or wl.budget, {n: model_weight_bytes(m) for n, m in built.items()})
    repeats = a.repeats or wl.repeats
    inputs = {n: tuple(x.to(wl.device) for x in spec.example_inputs()) for n, spec in specs.items()}
    outs, cycles_ms = {}, []
    with Session(budget, wl.device, workload=list(wl.order), cycle=wl.cycle) as s:
        for m in wl.models:
            s.add(m.name, built[m.name], files[m.name], max_unit=m.max_unit)
        for r in range(repeats):
            t0 = time.perf_counter()
            for name in wl.order:
                outs[name] = s.run(name, *inputs[name])
            cycles_ms.append((time.perf_counter() - t0) * 1e3)
            print(f"repeat {r + 1}/{repeats}: {cycles_ms[-1]:.1f} ms", file=sys.stderr, flush=True)
        report = s.report()
    print(report)
    equal = {}
    if a.check:
        from .eager import load_eager
        from .outputs import outputs_equal, tensors_of
        for n in outs:  # one eager model at a time: they need not fit together
            with torch.no_grad():
                ref = load_eager(build_empty(specs[n].build), files[n]).to(wl.device)(*inputs[n])
            equal[n] = outputs_equal(tensors_of(outs[n]), tensors_of(ref), exact=wl.device == "cpu")
            print(f"{n}: outputs equal to eager: {'yes' if equal[n] else 'NO'}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"workload_file": a.workload, "order": list(wl.order), "cycle": wl.cycle, "device": wl.device,
                       "cycles_ms": cycles_ms, "outputs_equal": equal or None, **report.as_dict()}, f, indent=1)
    return 0 if all(equal.values()) else 1
