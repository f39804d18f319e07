"""`layerstream bench WORKLOAD.toml --mode workload`: a Session's workload, measured as bench measures a model.

The workload is the TOML `layerstream session` reads, run by the same code (session_cli: prepare,
open_session, run_cycles) in a fresh process, so peak RSS is its own. The first LEARNING_CALLS cycles
learn (order, timed call, serial call, then a plan from costs) and are left out of the medians; then
`repeat` cycles are measured. Per model: the fields a `bench` run has where they apply; peak RSS per
model is the process's peak during that model's calls (VmHWM, reset before each call). Totals: the
cycle's latency, the sum of the models' bounds (one per call of the cycle) and the ratio to it. A
model's compute (its bound's floor) is the fastest eager time measured in the invocation: the
reference run in layerstream's process, or the eager baseline's when it ran.

With `--baselines`, the same sequence two other ways, each in its own fresh process:
- load-then-run: per turn, the model's whole state dict loaded from safetensors, run, freed; freed
  includes its file's page cache (evicted before each load): the premise is memory that cannot hold
  every model, and a cache that kept all the files would be all of them in memory (memory is RSS plus
  page cache everywhere in bench);
- eager: every model loaded once and kept resident, when their weights fit in the memory available.
"""
from __future__ import annotations

import os
import statistics
import tempfile

from .bench import _compare, _save_outputs, bounds, spawn
from .budget import fmt_bytes
from .measure import disk_read_bps, evict_files, page_cache_bytes, peak_rss_bytes
from .session_report import LEARNING_CALLS

SYSTEMS = ("layerstream", "load-then-run", "eager")


def _reset_peak_rss() -> None:
    """Start a new VmHWM (Linux: writing 5 to clear_refs resets the peak resident set)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(cfg: dict) -> dict:
    """One system running the workload, in this (fresh) process; outputs saved under cfg["out"]."""
    import torch

    from .eager import load_eager
    from .meta import build_empty
    from .session_cli import eager_check, load_workload, open_session, prepare, run_cycles

    wl = load_workload(cfg["workload"])
    p = prepare(wl, cfg.get("budget"))
    system, warmup = cfg["system"], (LEARNING_CALLS if cfg["system"] == "layerstream" else 1)
    peak = {"all": peak_rss_bytes()}
    rss = {n: 0 for n in wl.order}
    read: dict[str, list[int]] = {n: [] for n in wl.order}  # bytes the model had read, after each of its calls
    misses: dict[str, list[int]] = {n: [] for n in wl.order}

    def before(name):
        peak["all"] = max(peak["all"], peak_rss_bytes())
        _reset_peak_rss()
        if system == "load-then-run":  # then-free: its pages cannot stay (module docstring); not timed
            evict_files([p.files[name]])

    def after(name):
        rss[name] = max(rss[name], peak_rss_bytes())
        if s is not None:
            sm = s._models[name]
            st = sm._exec.stats if sm._exec is not None else sm._kept_stats
            read[name].append(st.bytes_read)
            misses[name].append(st.demand_misses)

    s, resident = None, {}
    with torch.no_grad():
        if system == "layerstream":
            s = open_session(wl, p, profile_cache="refresh")  # a benchmark measures
            call = lambda n: s.run(n, *p.inputs[n])  # noqa: E731
        elif system == "load-then-run":
            def call(n):
                model = load_eager(build_empty(p.specs[n].build), p.files[n]).to(wl.device)
                return model(*p.inputs[n])  # freed when `model` goes at return
        else:
            resident = {n: load_eager(build_empty(p.specs[n].build), p.files[n]).to(wl.device) for n in p.specs}
            call = lambda n: resident[n](*p.inputs[n])  # noqa: E731
        try:
            outs, cycles_ms, calls_ms = run_cycles(call, wl.order, warmup + cfg["repeat"], before=before, after=after)
            report = s.report() if s is not None else None
        finally:
            if s is not None:
                s.close()
    peak_all = max([peak["all"], peak_rss_bytes(), *rss.values()])
    resident.clear()
    models = []
    for name in dict.fromkeys(wl.order):
        k = wl.order.count(name)  # calls of this model per cycle
        lat = calls_ms[name]
        r = {"name": name, "calls": len(lat), "latency_ms": statistics.median(lat[warmup * k:]),
             "latency_ms_all": lat, "peak_rss_bytes": rss[name], "weight_bytes": p.weight_bytes[name]}
        if report is not None:
            m = next(m for m in report.models if m.name == name)
            r.update(bytes_read=(read[name][-1] - read[name][-1 - k]) // k if len(read[name]) > k else read[name][-1],
                     arena_peak_bytes=m.arena_peak_bytes, demand_misses=m.demand_misses,
                     warm_demand_misses=misses[name][-1] - misses[name][warmup * k - 1], reader=m.reader,
                     prefetched=m.prefetched, out_of_order=m.out_of_order)
        else:  # load-then-run reads every weight each call; eager reads none once loaded
            r.update(bytes_read=p.weight_bytes[name] if system == "load-then-run" else 0,
                     arena_peak_bytes=p.weight_bytes[name], demand_misses=0)
        _save_outputs(outs[name], os.path.join(cfg["out"], f"{system}-{name}.safetensors"))
        models.append(r)
    res = {"system": system, "budget_bytes": p.budget_bytes if s is not None else None, "models": models,
           "cycles_ms": cycles_ms, "cycle_ms": statistics.median(cycles_ms[warmup:]), "peak_rss_bytes": peak_all,
           # now, before the reference runs below read the files through the page cache
           "page_cache_bytes": page_cache_bytes(list(dict.fromkeys(p.files.values())))}
    if system == "layerstream":  # the reference: each model eager, alone, its compute time measured warm
        res["compute_ms"] = {}
        for m in models:
            n = m["name"]
            _, ref, res["compute_ms"][n] = eager_check(p.specs[n], p.files[n], p.inputs[n], outs[n], wl.device, 3)
            _save_outputs(ref, os.path.join(cfg["out"], f"ref-{n}.safetensors"))
    return res


def bench_workload(path: str, repeat: int | None = None, baselines: bool = False, budget: str | None = None,
                   log=print) -> dict:
    """The workload run by layerstream (and, with baselines, the two other ways); JSON-ready."""
    from .session_cli import load_workload, prepare
    wl = load_workload(path)
    repeat = repeat or wl.repeats  # measured cycles, after the learning ones
    p = prepare(wl, budget)  # resolves the weight files (made once and cached) and the budget, here
    files = [p.files[n] for n in dict.fromkeys(wl.order)]
    systems = ["layerstream"]
    if baselines:
        systems.append("load-then-run")
        avail = _mem_available()
        need = sum(p.weight_bytes.values())
        systems.append("eager" if need * 1.25 < avail else
                       f"skipped: every model's weights ({need / 1e9:.2f} GB) need more than 80% of the "
                       f"memory available ({avail / 1e9:.2f} GB)")
    runs, compute = [], None
    with tempfile.TemporaryDirectory(prefix="layerstream-bench-workload-") as tmp:
        for i, system in enumerate(systems):
            if system.startswith("skipped"):
                runs.append({"system": "eager", "skipped": system.removeprefix("skipped: ")})
                continue
            bps = {f: disk_read_bps(f)[0] for f in dict.fromkeys(files)} if system != "eager" else {}
            evict_files(files)
            log(f"[{i + 1}/{len(systems)}] {system}: {' -> '.join(wl.order)}, {LEARNING_CALLS if i == 0 else 1} "
                f"warm-up + {repeat} cycles" + "".join(f"; {os.path.basename(f)} {b / 1e9:.2f} GB/s" for f, b in bps.items()))
            r = spawn({"workload": path, "system": system, "repeat": repeat, "budget": budget, "out": tmp})
            compute = compute or r.pop("compute_ms")
            for m in r["models"]:
                f = p.files[m["name"]]
                m["disk_read_bps"] = bps.get(f)
                m["compute_ms"] = compute[m["name"]]
                m.update(bounds({"mode": "warm", "bytes_read": m["bytes_read"]}, m["compute_ms"], bps.get(f)))
                m["outputs_equal"], m["max_abs_diff"] = _compare(
                    os.path.join(tmp, f"ref-{m['name']}.safetensors"),
                    os.path.join(tmp, f"{system}-{m['name']}.safetensors"), exact=wl.device == "cpu")
            r.update(_totals(r, wl.order))
            log(f"      cycle {r['cycle_ms']:.1f} ms (bound {r['bound_ms']:.1f} ms), peak RSS "
                f"{r['peak_rss_bytes'] / 1e6:.0f} MB" + ("" if r["outputs_equal"] else "; outputs differ"))
            runs.append(r)
    _fastest_compute(runs, wl.order)
    speedup = {r["system"]: r["cycle_ms"] / runs[0]["cycle_ms"] for r in runs[1:] if not r.get("skipped")}
    return {"workload_file": path, "mode": "workload", "order": list(wl.order), "cycle": wl.cycle,
            "device": wl.device, "budget_bytes": p.budget_bytes, "weight_bytes": sum(p.weight_bytes.values()),
            "repeat": repeat, "baselines": baselines, "learning_cycles": LEARNING_CALLS,
            "speedup": speedup, "runs": runs}  # speedup: a baseline's cycle over layerstream's


def table(result: dict) -> str:
    """Markdown: one row per system and model, then the system's cycle against the sum of the bounds."""
    rows = ["| system | model | latency ms | bound ms | latency / bound | read per call | peak RSS | arena peak "
            "| misses | outputs equal |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r.get("skipped"):
            rows.append(f"| {r['system']} | skipped: {r['skipped']} |" + " – |" * 8)
            continue
        for m in r["models"]:
            rows.append(f"| {r['system']} | {m['name']} | {m['latency_ms']:.1f} | {m['bound_ms']:.1f} | "
                        f"{m['latency_ms'] / m['bound_ms']:.2f} | {fmt_bytes(m['bytes_read'])} | "
                        f"{fmt_bytes(m['peak_rss_bytes'])} | {fmt_bytes(m['arena_peak_bytes'])} | "
                        f"{m['demand_misses']} | {'yes' if m['outputs_equal'] else 'NO'} |")
        sp = result["speedup"].get(r["system"])
        rows.append(f"| {r['system']} | **cycle** | {r['cycle_ms']:.1f} | {r['bound_ms']:.1f} (sum) | "
                    f"{r['cycle_over_bound']:.2f} | {fmt_bytes(r['bytes_read'])} | {fmt_bytes(r['peak_rss_bytes'])} | "
                    + (fmt_bytes(r["budget_bytes"]) + " budget" if r.get("budget_bytes") else "–")
                    + f" | {r['demand_misses']} | {'yes' if r['outputs_equal'] else 'NO'}"
                    + (f"; {sp:.2f}x layerstream's cycle" if sp else "") + " |")
    return "\n".join(rows)


def _totals(r: dict, order) -> dict:
    """The cycle against the sum of its calls' bounds: each model's bound once per call in the cycle."""
    by = {m["name"]: m for m in r["models"]}
    bound = sum(by[n]["bound_ms"] for n in order)
    return {"bound_ms": bound, "cycle_over_bound": r["cycle_ms"] / bound,
            "bytes_read": sum(by[n]["bytes_read"] for n in order),
            "outputs_equal": all(m["outputs_equal"] for m in r["models"]),
            "demand_misses": sum(m["demand_misses"] for m in r["models"])}


def _fastest_compute(runs: list[dict], order) -> None:
    """Each model's compute is the fastest eager time measured in this invocation: the reference runs in
    layerstream's process, or the eager system's own (a fresh process) when it ran. A bound is a floor,
    so a slow moment in one of them must not raise it; every run's bounds and totals are redone."""
    eager = next((r for r in runs if r["system"] == "eager" and not r.get("skipped")), None)
    if eager is None:
        return
    fastest = {m["name"]: min(m["compute_ms"], m["latency_ms"]) for m in eager["models"]}
    for r in runs:
        if r.get("skipped"):
            continue
        for m in r["models"]:
            m["compute_ms"] = fastest[m["name"]]
            m.update(bounds({"mode": "warm", "bytes_read": m["bytes_read"]}, m["compute_ms"], m["disk_read_bps"]))
        r.update(_totals(r, order))


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0
