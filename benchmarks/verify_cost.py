"""What checking every read of a packed file costs: the same model streamed with verify on and off.

Packs a zoo model in execution order (once, cached beside its weights), then streams it twice in one
process, verify on and off, alternating calls so both see the same disk and the same noise. Reports
the medians, their ratio, and the hashing time itself (the trace's "verify" spans of the last call).

    .venv/bin/python benchmarks/verify_cost.py zoo:vit-b16 --budget 25% --calls 8 --json benchmarks/verify-vit-b16.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

import layerstream as ls
from layerstream.meta import build_empty
from layerstream.models import resolve, weights_for
from layerstream.pack import pack


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--budget", default="25%")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--json")
    a = p.parse_args()
    spec = resolve(a.model)
    weights = str(weights_for(a.model, spec, None))
    packed = weights.replace(".safetensors", "") + ".packed.safetensors"
    if not os.path.exists(packed):
        print(f"packing {weights} -> {packed} (in execution order) ...", flush=True)
        pack(weights, packed, spec=spec)
    inputs = spec.example_inputs()
    runs = {}
    with ls.stream(build_empty(spec.build), packed, budget=a.budget, verify=True) as on, \
            ls.stream(build_empty(spec.build), packed, budget=a.budget, verify=False) as off:
        lat: dict[str, list[float]] = {"on": [], "off": []}
        with torch.no_grad():
            for sm in (on, off):  # the learning calls (6 to 9), then the alternating timed ones
                for _ in range(12):
                    plan = sm.plan
                    sm(*inputs)
                    if sm.learning in ("done", "check") and sm.plan is plan:
                        break
            for _ in range(a.calls):
                for name, sm in (("on", on), ("off", off)):
                    t = time.perf_counter()
                    sm(*inputs)
                    lat[name].append((time.perf_counter() - t) * 1e3)
        _, _, c0, c1, _ = [e for e in on.trace.events if e[1] == "call"][-1]
        hash_ms = sum(e[3] - e[2] for e in on.trace.events if e[1] == "verify" and c0 <= e[2] <= c1) / 1e6
        r = on.report()
        runs = {"model": a.model, "budget_bytes": r.budget_bytes, "bytes_read_per_call": r.bytes_read_last_call,
                "verify_on_ms": statistics.median(lat["on"]), "verify_off_ms": statistics.median(lat["off"]),
                "hash_ms_last_call": hash_ms, "latency_ms_all": lat}
    runs["ratio"] = runs["verify_on_ms"] / runs["verify_off_ms"]
    runs["hash_gb_per_s"] = runs["bytes_read_per_call"] / max(runs["hash_ms_last_call"], 1e-9) / 1e6
    print(json.dumps({k: v for k, v in runs.items() if k != "latency_ms_all"}, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
