"""`layerstream bench`: eager and streamed runs side by side, each in a fresh process.

A fresh process per configuration makes peak RSS (VmHWM) a clean measurement of that configuration
alone. The disk is measured in the same invocation, with the same reader, right before each streamed
run, because this machine's disk swings between about 1 and 4.6 GB/s: a bound computed from another
run's disk figure would mean nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from .budget import fmt_bytes
from .measure import disk_read_bps, peak_rss_bytes
from .outputs import outputs_equal, tensors_of


def worker(cfg: dict) -> dict:
    """One configuration, in this (fresh) process: build, load or stream, time `repeat` warm calls."""
    from safetensors.torch import save_file

    from .eager import load_eager
    from .meta import build_empty
    from .models import resolve
    from .stream import model_weight_bytes, stream

    spec = resolve(cfg["model"])
    t0 = time.perf_counter()
    model = build_empty(spec.build)
    build_s = time.perf_counter() - t0
    device = torch.device(cfg.get("device", "cpu"))
    inputs = tuple(x.to(device) for x in spec.example_inputs())
    weight_bytes = model_weight_bytes(model)
    res = {"system": cfg["system"], "mode": "warm"}
    if cfg["system"] == "eager":
        run = load_eager(model, cfg["weights"]).to(device)
    else:
        run = stream(model, cfg["weights"], budget=cfg["budget"], io=cfg.get("io", "auto"), device=device,
                     max_unit=cfg.get("max_unit"))
    lat, first_misses = [], 0
    warmup = 1 if cfg["system"] == "eager" else 3  # streamed: calls 1-3 learn the order and the costs
    with torch.no_grad():
        for i in range(cfg["repeat"] + warmup):
            t = time.perf_counter()
            out = run(*inputs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            lat.append((time.perf_counter() - t) * 1e3)
            if i == warmup - 1 and cfg["system"] != "eager":
                first_misses = run.report().demand_misses
    save_file({f"o{i}": t.contiguous().cpu() for i, t in enumerate(tensors_of(out))}, cfg["out"])
    if cfg["system"] == "eager":
        res.update(budget_bytes=weight_bytes, arena_peak_bytes=weight_bytes, bytes_read=0, demand_misses=0)
    else:
        r = run.report()
        if cfg.get("trace"):
            run.trace.save_chrome(cfg["trace"])
        res.update(budget_bytes=r.budget_bytes, arena_peak_bytes=r.arena_peak_bytes,
                   bytes_read=r.bytes_read_last_call, demand_misses=r.demand_misses, reader=r.reader,
                   planner=r.planner, predicted_ms=r.predicted_ms, plan_read_bps=r.read_bps,
                   warm_demand_misses=r.demand_misses - first_misses)
        run.close()
    if device.type == "cuda":
        res["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    res.update(latency_ms=statistics.median(lat[warmup:]), latency_ms_all=lat, peak_rss_bytes=peak_rss_bytes(),
               weight_bytes=weight_bytes, build_s=build_s)
    return res


def spawn(cfg: dict) -> dict:
    """Run one configuration in a fresh process (see worker) and return its result."""
    proc = subprocess.run([sys.executable, "-m", "layerstream.bench", json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {cfg['system']} {cfg.get('budget', '')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _equal(a: str, b: str, exact: bool = True) -> bool:
    """The outputs two workers saved are equal (see outputs_equal)."""
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and outputs_equal([x[k] for k in x], [y[k] for k in x], exact)


def bench(model: str, weights: str, budgets: list[str], repeat: int = 5, log=print, io: str = "auto",
          device: str = "cpu") -> dict:
    """Eager, then layerstream at each budget; returns the JSON-ready result (see README)."""
    runs, disk = [], []
    with tempfile.TemporaryDirectory(prefix="layerstream-bench-") as tmp:
        ios = ["aio", "threads"] if io == "both" else [io]
        cfgs = [{"system": "eager"}] + [{"system": "layerstream", "budget": b, "io": i} for b in budgets for i in ios]
        for i, cfg in enumerate(cfgs):
            cfg.update(model=model, weights=str(weights), repeat=repeat, device=device,
                       out=os.path.join(tmp, f"out{i}.safetensors"))
            label = cfg["system"] + (f" at {cfg['budget']} ({cfg['io']} I/O)" if "budget" in cfg else "")
            bps = None
            if cfg["system"] == "layerstream":
                bps, _ = disk_read_bps(weights, io="threads" if cfg["io"] == "threads" else "auto")
                disk.append(bps)
                log(f"[{i + 1}/{len(cfgs)}] disk {bps / 1e9:.2f} GB/s; {label} ...")
            else:
                log(f"[{i + 1}/{len(cfgs)}] {label} ...")
            r = spawn(cfg)
            r["outputs_equal"] = True if i == 0 else _equal(cfgs[0]["out"], cfg["out"], exact=device == "cpu")
            eager_ms = runs[0]["latency_ms"] if runs else r["latency_ms"]
            r["disk_read_bps"] = bps
            r["bound_ms"] = max(eager_ms, r["bytes_read"] / bps * 1e3) if bps else eager_ms
            log(f"      {r['latency_ms']:.1f} ms (bound {r['bound_ms']:.1f} ms), peak RSS {fmt_bytes(r['peak_rss_bytes'])}")
            runs.append(r)
    return {"model": model, "weight_bytes": runs[0]["weight_bytes"], "device": device,
            "torch_threads": torch.get_num_threads(), "disk_read_bps": statistics.median(disk) if disk else None,
            "runs": runs}


def table(result: dict) -> str:
    """A markdown table of a bench result, eager first."""
    eager = result["runs"][0]
    head = ("| system | budget | latency ms | bound ms | latency / bound | peak RSS | RSS saved / (weights − budget) "
            "| weight memory | read per call | outputs equal | warm demand misses |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["runs"]:
        saved = eager["peak_rss_bytes"] - r["peak_rss_bytes"]
        room = result["weight_bytes"] - r["budget_bytes"]
        share = f"{saved / room:.0%}" if r["system"] != "eager" and room > 0 else "–"
        budget = "–" if r["system"] == "eager" else f"{fmt_bytes(r['budget_bytes'])} ({r['budget_bytes'] / result['weight_bytes']:.0%})"
        rows.append(f"| {r['system']} | {budget} | {r['latency_ms']:.1f} | {r['bound_ms']:.1f} | "
                    f"{r['latency_ms'] / r['bound_ms']:.2f} | {fmt_bytes(r['peak_rss_bytes'])} | {share} | "
                    f"{fmt_bytes(r['arena_peak_bytes'])} | {fmt_bytes(r['bytes_read'])} | "
                    f"{'yes' if r['outputs_equal'] else 'NO'} | {r.get('warm_demand_misses', r['demand_misses'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
