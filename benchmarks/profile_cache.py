"""What the profile cache saves: a model's first calls streamed with the cost model learned, then cached.

Streams a zoo model twice, one after the other in one process at one budget: first measuring its cost
model (profile_cache="refresh": call 1 learns the order, call 2 is timed with reads overlapping, call 3
with reads serial, then greedy re-plans), then again finding it in the cache (greedy's plan from call 2
on). One untimed stream first, so that neither pays the process's warm-up. Reports each call's
latency, the calls and the time until the planned plan runs, the time spent outside calls (opening,
learning's own work) and the disk speed measured in the same invocation.

    .venv/bin/python benchmarks/profile_cache.py zoo:vit-b16 --budget 25% --calls 6 --json benchmarks/profile-cache-vit-b16.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import layerstream as ls
from layerstream.measure import disk_read_bps
from layerstream.meta import build_empty
from layerstream.models import resolve, weights_for


def run(spec, weights: str, budget: str, calls: int, cache: str) -> dict:
    inputs = spec.example_inputs()
    lat, learning = [], []
    t0 = time.perf_counter()
    with ls.stream(build_empty(spec.build), weights, budget=budget, profile_cache=cache) as sm, torch.no_grad():
        for _ in range(calls):
            t = time.perf_counter()
            sm(*inputs)
            lat.append((time.perf_counter() - t) * 1e3)
            learning.append(sm.costs is not None)
        r = sm.report()
    planned = next((i + 1 for i, known in enumerate(learning) if known), calls)  # the calls after run the plan
    wall = time.perf_counter() - t0
    return {"profile_cache": cache, "latency_ms_all": lat, "wall_s_incl_open": wall,
            "outside_calls_s": wall - sum(lat) / 1e3,  # opening, and learning's own work between calls
            "calls_until_planned": planned, "ms_until_planned": sum(lat[:planned]),
            "steady_ms": statistics.median(lat[planned:]) if planned < calls else None,
            "planner": r.planner, "predicted_ms": r.predicted_ms, "notes": r.notes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--budget", default="25%")
    p.add_argument("--calls", type=int, default=6)
    p.add_argument("--json")
    a = p.parse_args()
    spec = resolve(a.model)
    weights = str(weights_for(a.model, spec, None))
    bps = disk_read_bps(weights)[0]
    with ls.stream(build_empty(spec.build), weights, budget=a.budget, profile_cache="off") as sm:
        sm(*spec.example_inputs())  # untimed: the process's first stream pays for imports and warm-up
    measured = run(spec, weights, a.budget, a.calls, "refresh")
    cached = run(spec, weights, a.budget, a.calls, "on")
    out = {"model": a.model, "budget": a.budget, "disk_read_bps": bps, "measured": measured, "cached": cached,
           "first_calls_ms_ratio": sum(measured["latency_ms_all"]) / sum(cached["latency_ms_all"])}
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
