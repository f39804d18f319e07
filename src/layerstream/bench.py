"""`layerstream bench`: eager, layerstream and its peers side by side, each run in a fresh process.

A fresh process per run makes peak RSS (VmHWM) a clean measurement of that run alone. The disk is
measured in the same invocation, with the same reader, right before each run that reads weights,
because this machine's disk swings between about 1 and 4.6 GB/s: a bound computed from another run's
disk figure would mean nothing.

Memory is what the user pays for: peak RSS plus the page-cache bytes of the files the system read
(its weight file, or a peer's offload folder), measured right after the run. Before every run those
files are evicted from the cache, so the cache left behind is that run's own doing.

Modes (a run's `mode`):
- warm: calls repeat in one process; the median after warm-up calls is the latency.
- cold: the weight file is evicted and one call is timed from the moment weights start to load to the
  first output. Imports are timed apart (`import_s`: from the parent's spawn, so interpreter start is in
  it, to the end of a throwaway meta build that imports the model's lazily loaded modules), and so is
  building the model on meta (`build_s`).
  `repeat` cold starts, each a fresh process, give the median.
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

from .benchreport import table  # noqa: F401  (the CLI and scripts import it from here)
from .budget import fmt_bytes
from .measure import disk_read_bps, evict_files, page_cache_bytes, peak_rss_bytes
from .outputs import outputs_equal, tensors_of
from .peers import PEERS

# Warm-up calls at most while a stream still learns (learn.py: 6 to 9 if anything streams, 12 if it goes back
# to a plan and fits it again; more for retries).
LEARNING_CALLS_MAX = 12
EAGER_SYSTEMS = ("eager", "load-then-run")  # the whole state dict loaded, then run


def _load(cfg: dict, model, device: torch.device):
    """`model` (on meta) made callable the way cfg's system does it; the first call may still read."""
    system = cfg["system"]
    if system in EAGER_SYSTEMS:
        from .eager import load_eager
        return load_eager(model, cfg["weights"]).to(device)
    if system == "layerstream":
        from .stream import stream
        # A benchmark measures: its cost model is learned in the run (and cached for later streams),
        # never taken from whatever an earlier run left in the cache.
        return stream(model, cfg["weights"], budget=cfg["budget"], io=cfg.get("io", "auto"), device=device,
                      max_unit=cfg.get("max_unit"), profile_cache=cfg.get("profile_cache", "refresh"))
    from .peers import attach
    return attach(system, model, cfg["offload_dir"], device)


def _beside_eager(cfg: dict, spec, run, inputs, device: torch.device, lat: list[float]):
    """`repeat` calls of `run` (after its warm-up `lat`), each right after a call of the model loaded
    eagerly in this process: the host's speed moves within seconds (see benchmarks/RESULTS.md), so a
    ratio to eager from runs minutes apart says more about the host than about the plan. Returns
    (`lat` with the calls appended, eager's median). The eager copy holds every weight: this run's peak
    RSS is not the stream's. The loads a streamed call's end issues for the next land during eager's
    call (a few MiB with kernel AIO), a little more than back-to-back calls would have read ahead."""
    from .eager import load_eager
    from .meta import build_empty
    eager = load_eager(build_empty(spec.build), cfg["weights"]).to(device)
    evict_files([cfg["weights"]])  # loading it cached the file: a buffered reader would read from there
    _call(eager, inputs, device)  # warm-up
    ms_eager = []
    for _ in range(cfg["repeat"]):
        ms_eager.append(_call(eager, inputs, device)[1])
        lat.append(_call(run, inputs, device)[1])
    del eager
    return lat, statistics.median(ms_eager)


def _call(run, inputs, device: torch.device):
    """One call, timed to its output (CUDA synchronised); returns (output, milliseconds)."""
    t = time.perf_counter()
    with torch.no_grad():
        out = run(*inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - t) * 1e3


def worker(cfg: dict) -> dict:
    """One run, in this (fresh) process: build on meta, load (or attach) and call, warm or cold."""
    if cfg.get("workload"):  # --mode workload: several models (benchwork.py)
        from .benchwork import worker as workload_worker
        return workload_worker(cfg)
    if cfg.get("prepare"):
        return _prepare(cfg)
    from .eager import load_eager  # noqa: F401  (imports happen before anything is timed)
    from .meta import build_empty
    from .models import resolve
    from .stream import model_weight_bytes, stream  # noqa: F401
    if cfg["system"] in PEERS:
        from .peers import import_library
        import_library(cfg["system"])
    spec = resolve(cfg["model"])
    build_empty(spec.build)  # a first build imports the model's own modules (transformers loads them lazily)
    import_s = time.time() - cfg["t_spawn"] if "t_spawn" in cfg else None  # interpreter start included

    t0 = time.perf_counter()
    model = build_empty(spec.build)
    build_s = time.perf_counter() - t0
    device = torch.device(cfg.get("device", "cpu"))
    inputs = tuple(x.to(device) for x in spec.example_inputs())
    weight_bytes = model_weight_bytes(model)
    mode, system = cfg.get("mode", "warm"), cfg["system"]
    res = {"system": system, "mode": mode, "import_s": import_s, "build_s": build_s}
    if mode == "cold":
        t = time.perf_counter()  # weights start to load here: from the constructor to the first output
        run = _load(cfg, model, device)
        out, _ = _call(run, inputs, device)
        lat = [(time.perf_counter() - t) * 1e3]
        warmup = 0
        res["first_output_s"] = lat[0] / 1e3
    else:
        run = _load(cfg, model, device)
        lat, warmup = [], 1
        if system == "layerstream":  # the first calls learn the order and costs (6 to 12: learn.py), at least 3,
            warmup = 0  # and a call that re-planned is followed by one more (a new plan's first starts empty)
            while warmup < LEARNING_CALLS_MAX:
                plan = run.plan
                out, ms = _call(run, inputs, device)
                lat.append(ms)
                warmup += 1
                if warmup >= 3 and run.learning in ("done", "check") and run.plan is plan:
                    break
            res["first_misses"] = run.report().demand_misses
        if cfg.get("beside_eager"):  # the same calls alternating with eager's, so both see the host alike
            lat, res["eager_beside_ms"] = _beside_eager(cfg, spec, run, inputs, device, lat)
        for _ in range(cfg["repeat"] + warmup - len(lat)):
            out, ms = _call(run, inputs, device)
            lat.append(ms)
    _save_outputs(out, cfg["out"])
    if system == "layerstream":
        res.update(_stream_fields(run, cfg, res.pop("first_misses", 0)))
    else:
        # Eager holds every weight; a peer reads every weight from its folder each call.
        res.update(budget_bytes=weight_bytes if system in EAGER_SYSTEMS else None,
                   arena_peak_bytes=weight_bytes if system in EAGER_SYSTEMS else None,
                   bytes_read=0 if (system == "eager" and mode == "warm") else weight_bytes, demand_misses=0)
    if device.type == "cuda":
        res["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    res.update(latency_ms=statistics.median(lat[warmup:]), latency_ms_all=lat, peak_rss_bytes=peak_rss_bytes(),
               weight_bytes=weight_bytes)
    return res


def _stream_fields(run, cfg: dict, first_misses: int) -> dict:
    r = run.report()
    if cfg.get("trace"):
        run.trace.save_chrome(cfg["trace"])
    # cold: everything read so far, resident units loaded before the call included
    read = r.bytes_read if cfg.get("mode") == "cold" else r.bytes_read_last_call
    out = dict(budget_bytes=r.budget_bytes, arena_peak_bytes=r.arena_peak_bytes, bytes_read=read,
               demand_misses=r.demand_misses, reader=r.reader, planner=r.planner, predicted_ms=r.predicted_ms,
               plan_read_bps=r.read_bps, warm_demand_misses=r.demand_misses - first_misses, notes=r.notes,
               first_unit_bytes=run.sizes[run.cap.program.steps[0]] if run.cap.program.steps else 0)
    run.close()
    return out


def _save_outputs(out, path: str) -> None:
    from safetensors.torch import save_file
    save_file({f"o{i}": t.contiguous().cpu() for i, t in enumerate(tensors_of(out))}, path)


def _prepare(cfg: dict) -> dict:
    """A peer's offload folder, written from the eagerly loaded model (a one-off step, timed apart)."""
    from .eager import load_eager
    from .meta import build_empty
    from .models import resolve
    from .peers import prepare, tied_parameters

    model = build_empty(resolve(cfg["model"]).build)
    t0 = time.perf_counter()
    prepare(cfg["system"], load_eager(model, cfg["weights"]), cfg["offload_dir"])
    return {"prepare_s": time.perf_counter() - t0, "prepare_peak_rss_bytes": peak_rss_bytes(),
            "tied_parameters": tied_parameters(model)}


def spawn(cfg: dict) -> dict:
    """Run one configuration in a fresh process (see worker) and return its result."""
    cfg = {**cfg, "t_spawn": time.time()}
    proc = subprocess.run([sys.executable, "-m", "layerstream.bench", json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker for {cfg['system']} {cfg.get('budget', '')} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compare(a: str, b: str, exact: bool = True) -> tuple[bool, float]:
    """The outputs two workers saved are equal (see outputs_equal), and their largest difference."""
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys() or any(x[k].shape != y[k].shape for k in x):
        return False, float("inf")
    diff = max(((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel()), default=0.0)
    return outputs_equal([x[k] for k in x], [y[k] for k in x], exact), diff


def configurations(budgets: list[str], mode: str = "warm", baselines: bool = False, ios=("auto",)) -> list[dict]:
    """The runs of one invocation, in order. Eager comes first: its outputs are the reference and its
    latency the compute time every bound uses. load-then-run is the cold start users know."""
    cfgs = [{"system": "eager", "mode": "warm"}]
    if mode == "cold" or baselines:
        cfgs.append({"system": "load-then-run", "mode": "cold"})
    if baselines:
        cfgs += [{"system": p, "mode": mode} for p in PEERS]
    cfgs += [{"system": "layerstream", "mode": mode, "budget": b, "io": i} for b in budgets for i in ios]
    return cfgs


def bounds(r: dict, eager_ms: float, bps: float | None) -> dict:
    """The physical floor of a run: what no system could beat on this disk with this compute.

    warm: max(compute, bytes read per call ÷ disk speed); cold: max(compute, every weight ÷ disk speed)
    plus the first unit's read (compute cannot start before it; a peer, with no unit cut, has none).
    """
    if r["mode"] == "cold":
        cold = max(eager_ms, r["weight_bytes"] / bps * 1e3) + r.get("first_unit_bytes", 0) / bps * 1e3
        return {"bound_ms": cold, "cold_bound_ms": cold}
    return {"bound_ms": max(eager_ms, r["bytes_read"] / bps * 1e3) if bps else eager_ms}


_MEDIAN_FIELDS = ("latency_ms", "first_output_s", "import_s", "build_s", "peak_rss_bytes", "page_cache_bytes",
                  "disk_read_bps")


def _median_run(samples: list[dict]) -> dict:
    """One run from several cold starts: each measured figure is the median of its samples."""
    r = dict(samples[len(samples) // 2])
    for k in _MEDIAN_FIELDS:
        vals = [s[k] for s in samples if s.get(k) is not None]
        if vals:
            r[k] = statistics.median(vals)
    r["latency_ms_all"] = [s["latency_ms"] for s in samples]
    r["cold_starts"] = len(samples)
    return r


class _Invocation:
    """The state one bench invocation shares across its runs: folders, the reference, logging."""

    def __init__(self, model: str, weights: str, repeat: int, device: str, tmp: str, log):
        self.model, self.weights, self.repeat, self.device, self.tmp, self.log = model, weights, repeat, device, tmp, log
        self.runs: list[dict] = []
        self.ref_out: str | None = None

    def run(self, i: int, n: int, cfg: dict) -> dict:
        system = cfg["system"]
        label = system + (f" at {cfg['budget']} ({cfg['io']} I/O)" if "budget" in cfg else "") + f", {cfg['mode']}"
        cfg.update(model=self.model, weights=self.weights, repeat=self.repeat, device=self.device,
                   out=os.path.join(self.tmp, f"out{i}.safetensors"))
        files, extra = [self.weights], {}
        if system in PEERS:
            cfg["offload_dir"] = os.path.join(self.tmp, f"offload-{system}")
            files.append(cfg["offload_dir"])
            why = _missing(system)
            if why:
                self.log(f"[{i + 1}/{n}] {label}: skipped: {why}")
                return {"system": system, "mode": cfg["mode"], "skipped": why}
            self.log(f"[{i + 1}/{n}] {system}: preparing its offload folder (timed apart) ...")
            try:
                extra = spawn({**cfg, "prepare": True})
            except RuntimeError as e:
                return self._skip(cfg, label, e)
        samples = []
        for k in range(self.repeat if cfg["mode"] == "cold" else 1):
            bps = None
            if system != "eager":
                bps, _ = disk_read_bps(self.weights, io="threads" if cfg.get("io") == "threads" else "auto")
            evict_files(files)  # the cache this run leaves is its own (and a cold start starts cold)
            self.log(f"[{i + 1}/{n}] {label}" + (f" (start {k + 1}/{self.repeat})" if cfg["mode"] == "cold" else "")
                     + (f"; disk {bps / 1e9:.2f} GB/s" if bps else "")
                     + ("; page cache of its weights evicted" if cfg["mode"] == "cold" else "") + " ...")
            try:
                s = spawn(cfg)
            except RuntimeError as e:
                # A peer that breaks, or a budget below this model's minimum, is a result to record.
                if system in PEERS or "BudgetError" in str(e).strip().splitlines()[-1]:
                    return self._skip(cfg, label, e)
                raise
            s.update(disk_read_bps=bps, page_cache_bytes=page_cache_bytes(files[-1]))
            samples.append(s)
        r = _median_run(samples) if len(samples) > 1 else samples[0]
        r.update(extra)
        return self._finish(r, cfg, label)

    def _finish(self, r: dict, cfg: dict, label: str) -> dict:
        if self.ref_out is None:
            self.ref_out = cfg["out"]
        r["outputs_equal"], r["max_abs_diff"] = _compare(self.ref_out, cfg["out"], exact=self.device == "cpu")
        if not r["outputs_equal"] and r.get("tied_parameters"):
            r["note"] = (f"outputs differ from eager (max abs diff {r['max_abs_diff']:.3g}); the model ties "
                         f"{', '.join(r['tied_parameters'])} to another parameter")
        eager_ms = self.runs[0]["latency_ms"] if self.runs else r["latency_ms"]
        r.update(bounds(r, eager_ms, r["disk_read_bps"]))
        r["memory_bytes"] = r["peak_rss_bytes"] + r["page_cache_bytes"]
        self.log(f"      {r['latency_ms']:.1f} ms (bound {r['bound_ms']:.1f} ms), peak RSS "
                 f"{fmt_bytes(r['peak_rss_bytes'])} + page cache {fmt_bytes(r['page_cache_bytes'])}"
                 + ("" if r["outputs_equal"] else f"; outputs differ (max abs diff {r['max_abs_diff']:.3g})"))
        return r

    def _skip(self, cfg: dict, label: str, e: Exception) -> dict:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else str(e)
        self.log(f"      {label} failed, recorded and skipped: {why}")
        return {"system": cfg["system"], "mode": cfg["mode"], "skipped": f"failed: {why}"}


def _missing(system: str) -> str | None:
    from .peers import missing
    return missing(system)


def bench(model: str, weights: str, budgets: list[str], repeat: int = 5, log=print, io: str = "auto",
          device: str = "cpu", mode: str = "warm", baselines: bool = False) -> dict:
    """Every configuration of one invocation (see configurations); returns the JSON-ready result."""
    if mode not in ("warm", "cold"):
        raise ValueError(f"bench mode {mode!r}: choose 'warm' (repeated calls) or 'cold' (first call, cache evicted)")
    cfgs = configurations(budgets, mode, baselines, ["aio", "threads"] if io == "both" else [io])
    with tempfile.TemporaryDirectory(prefix="layerstream-bench-") as tmp:
        inv = _Invocation(model, str(weights), repeat, device, tmp, log)
        for i, cfg in enumerate(cfgs):
            inv.runs.append(inv.run(i, len(cfgs), cfg))
    runs = inv.runs
    disk = [r["disk_read_bps"] for r in runs if r.get("disk_read_bps")]
    return {"model": model, "weight_bytes": runs[0]["weight_bytes"], "device": device, "mode": mode,
            "baselines": baselines, "repeat": repeat, "torch_threads": torch.get_num_threads(),
            "disk_read_bps": statistics.median(disk) if disk else None, "runs": runs}


if __name__ == "__main__":
    print(json.dumps(worker(json.loads(sys.argv[1]))))
