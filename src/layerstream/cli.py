"""The `layerstream` command: demo | run | bench | profile | plan | tradeoff | pack (and more; see `layerstream -h`)."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import LayerstreamError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_run(a) -> int:
    import torch

    from .meta import build_empty
    from .models import resolve, weights_for
    from .stream import stream

    spec = resolve(a.model)
    weights = weights_for(a.model, spec, a.weights)
    inputs = tuple(x.to(a.device) for x in spec.example_inputs())
    with stream(build_empty(spec.build), weights, budget=a.budget, max_unit=a.max_unit, reader=a.reader,
                device=a.device, profile_cache=a.profile_cache) as sm:
        _log(sm.plan.summary(sm.cap.program, sm.sizes))
        for i in range(a.repeat):
            out = sm(*inputs)
            _log(f"call {i + 1}/{a.repeat}: {sm.report().latency_ms:.1f} ms")
        print(sm.report())
        if a.trace:
            sm.trace.save_chrome(a.trace)
            _log(f"trace written to {a.trace} (open it in https://ui.perfetto.dev)")
    if a.check:
        from .eager import load_eager
        from .outputs import outputs_equal, tensors_of
        with torch.no_grad():
            ref = load_eager(build_empty(spec.build), weights).to(a.device)(*inputs)
        equal = outputs_equal(tensors_of(out), tensors_of(ref), exact=a.device == "cpu")
        print(f"outputs equal to eager: {'yes' if equal else 'NO'}")
        return 0 if equal else 1
    return 0


def cmd_bench(a) -> int:
    from .bench import bench, table
    from .models import resolve, weights_for
    from .peers import PEERS

    if getattr(a, "mode", "warm") == "workload":
        return cmd_bench_workload(a)
    spec = resolve(a.model)
    weights = weights_for(a.model, spec, a.weights)
    mode, baselines = getattr(a, "mode", "warm"), getattr(a, "baselines", False)
    repeat = a.repeat if a.repeat is not None else (5 if mode == "warm" else 3)
    result = bench(a.model, str(weights), a.budget or ["10%", "25%"], repeat=repeat, log=_log,
                   io=getattr(a, "io", "auto"), device=getattr(a, "device", "cpu"), mode=mode, baselines=baselines)
    disk = f"{result['disk_read_bps'] / 1e9:.2f} GB/s" if result["disk_read_bps"] else "not measured"
    print(f"\n{a.model}: {spec.description}; weights {result['weight_bytes'] / 1e6:.0f} MB, disk {disk} "
          f"(measured before each run); {mode}" + (": page cache evicted before each run, first output timed"
                                                  if mode == "cold" else "") + "\n")
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        _log(f"results written to {a.json}")
    if getattr(a, "results", None):
        import shlex

        from .benchreport import write_results
        cmd = ["layerstream", "bench", a.model, "--mode", mode] + (["--baselines"] if baselines else [])
        cmd += [x for b in a.budget or [] for x in ("--budget", b)] + ["--repeat", str(repeat)]
        cmd += (["--weights", a.weights] if a.weights else []) + (["--device", a.device] if a.device != "cpu" else [])
        md, png = write_results(a.results, result, shlex.join(cmd))
        _log(f"section written to {md}, picture to {png}")
    # A peer's wrong outputs are a finding to report, not a failure of this command.
    return 0 if all(r["outputs_equal"] for r in result["runs"] if r["system"] not in PEERS and not r.get("skipped")) else 1


def cmd_bench_workload(a) -> int:
    """`bench WORKLOAD.toml --mode workload`: the session's workload, and with --baselines the other ways."""
    from .benchwork import bench_workload, table
    ignored = [f for f, on in (("--weights", a.weights), ("--results", a.results), ("--io", a.io != "auto"),
                               ("a second --budget", len(a.budget or []) > 1)) if on]
    if ignored:  # the workload file names the weights and the I/O; one budget for the whole session
        raise SystemExit(f"layerstream bench --mode workload: {', '.join(ignored)} does not apply to a workload; "
                         "set weights in WORKLOAD.toml and pass at most one --budget")
    result = bench_workload(a.model, a.repeat, a.baselines, a.budget[0] if a.budget else None, log=_log)
    from .budget import fmt_bytes
    print(f"\n{a.model}: {' -> '.join(result['order'])}, budget {fmt_bytes(result['budget_bytes'])}; latency is "
          f"the median of {result['repeat']} cycles after the learning ones\n")
    print(table(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
        _log(f"results written to {a.json}")
    return 0 if all(r["outputs_equal"] for r in result["runs"] if not r.get("skipped")) else 1


def cmd_tradeoff(a) -> int:
    import tempfile

    from .budget import fmt_bytes
    from .models import resolve, weights_for
    from .plan.tradeoff import sweep
    from .profile import load_or_profile

    spec = resolve(a.model)
    weights = weights_for(a.model, spec, a.weights)
    prof, path, cached = load_or_profile(spec, weights, a.profile_budget, a.device, refresh=a.refresh, log=_log)
    if cached:
        _log(f"profile of {a.model} from {path} (--refresh to measure again)")
    program, sizes, costs, max_unit = prof.program, prof.sizes, prof.costs, prof.max_unit
    frontier = sweep(program, sizes, costs, a.steps)
    if not a.no_knee_fit:
        from .knee import calibrate_knee
        frontier = calibrate_knee(spec, weights, prof, frontier, a.device, a.steps, a.refresh, _log)
    if a.measure:
        from dataclasses import replace

        from .bench import spawn
        points = []
        with tempfile.TemporaryDirectory(prefix="layerstream-tradeoff-") as tmp:
            _log("measuring eager (every weight loaded, warm) ...")
            try:
                eager_ms = spawn({"system": "eager", "mode": "warm", "model": a.model, "weights": str(weights),
                                  "repeat": a.repeat, "device": a.device,
                                  "out": f"{tmp}/eager.safetensors"})["latency_ms"]
            except RuntimeError as e:  # e.g. a model larger than memory: the frontier is still measured
                _log(f"eager could not run here, so no measured eager line: {str(e).splitlines()[0]}")
                eager_ms = None
            for i, p in enumerate(frontier.points):
                _log(f"[{i + 1}/{len(frontier.points)}] measuring at {fmt_bytes(p.budget_bytes)} ...")
                cfg = {"system": "layerstream", "budget": p.budget_bytes, "model": a.model, "weights": str(weights),
                       "repeat": a.repeat, "device": a.device, "max_unit": max_unit, "out": f"{tmp}/o{i}.safetensors"}
                try:
                    r = spawn({**cfg, "beside_eager": eager_ms is not None})
                except RuntimeError as e:  # e.g. no memory for an eager copy beside the arena
                    if eager_ms is None:
                        raise
                    _log(f"  with eager beside it the run failed ({str(e).splitlines()[-1][:200]}): measured alone")
                    r = spawn(cfg)
                points.append(replace(p, measured_ms=r["latency_ms"], eager_ms=r.get("eager_beside_ms")))
        frontier = replace(frontier, points=tuple(points), eager_ms=eager_ms)
    knee, moved = frontier.knee_point, frontier.profile_knee_bytes
    print(f"\n{a.model}: compute {frontier.compute_ms:.1f} ms with every weight resident"
          + (f" (eager measured {frontier.eager_ms:.1f} ms)" if frontier.eager_ms else "")
          + f"; read speed {frontier.read_bps / 1e9:.2f} GB/s (calibrated); knee (predicted <= 1.05x compute"
          + (f" of {frontier.knee_compute_ms:.1f} ms, by costs fitted to calls at {fmt_bytes(knee.fitted_at)}; "
             f"the profile's costs put it at {fmt_bytes(moved)}" if knee and knee.fitted_at else "") + "): "
          + (fmt_bytes(knee.budget_bytes) if knee else "none")
          + (f", measured {knee.measured_ms / knee.eager_ms:.2f}x eager (calls alternating in one run)"
             if knee and knee.measured_ms and knee.eager_ms else "") + "\n")
    print("| budget | share | predicted ms | measured ms | eager beside ms | bound ms | read per call | planner |\n"
          "|---|---|---|---|---|---|---|---|")
    for p in frontier.points:
        mark = " (knee)" if p is knee else " (the profile's knee)" if moved and p.budget_bytes == moved else ""
        print(f"| {fmt_bytes(p.budget_bytes)}{mark} | {p.budget_bytes / frontier.weight_bytes:.0%} | "
              f"{p.predicted_ms:.1f} | " + (f"{p.measured_ms:.1f}" if p.measured_ms is not None else "–")
              + " | " + (f"{p.eager_ms:.1f}" if p.eager_ms is not None else "–")
              + f" | {p.bound_ms:.1f} | {fmt_bytes(p.streamed_bytes)} | {p.planner}"
              + (f" (costs fitted at {fmt_bytes(p.fitted_at)})" if p.fitted_at else "") + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "device": a.device, **frontier.as_dict()}, f, indent=1)
    if a.png:
        from .plot import plot_frontier
        plot_frontier(frontier, f"{a.model} ({a.device})", a.png)
        _log(f"frontier drawn to {a.png}")
    return 0


def _profiled(a):
    """(spec, weights, profile, its cache path, whether it was cached) for `profile` and `plan`."""
    from .models import resolve, weights_for
    from .profile import load_or_profile

    spec = resolve(a.model)
    weights = weights_for(a.model, spec, a.weights)
    return (spec, weights, *load_or_profile(spec, weights, a.budget, a.device, a.max_unit, refresh=a.refresh, log=_log))


def cmd_profile(a) -> int:
    """Measure (or find cached) the cost model planning uses, and say what it holds."""
    import shutil

    _, _, prof, path, cached = _profiled(a)
    print(f"{a.model} on {prof.key['device']}: " + ("cached" if cached else f"measured in {prof.measured_s:.1f} s")
          + f" ({path})\n  {prof.summary()}")
    if a.json:
        shutil.copyfile(path, a.json)
        _log(f"profile written to {a.json}")
    return 0


def cmd_plan(a) -> int:
    """Plan a budget from the cached profile (measuring it first if absent) and print the plan in words."""
    import time

    from .budget import fmt_bytes, parse_budget
    from .meta import build_empty
    from .plan.describe import describe
    from .plan.greedy import plan_greedy
    from .planfile import write_plan_file
    from .stream import model_weight_bytes

    spec, weights, prof, path, cached = _profiled(a)
    if cached:
        _log(f"profile of {a.model} from {path} (--refresh to measure again)")
    budget = parse_budget(a.budget, model_weight_bytes(build_empty(spec.build)))
    program, sizes, costs = prof.program, prof.sizes, prof.costs
    t = time.perf_counter()
    greedy = plan_greedy(program, sizes, costs, budget)
    extra: dict = {"greedy_latency_s": greedy[1].latency_s, "greedy_s": time.perf_counter() - t}
    plan, pred = greedy
    words = {}
    if a.solver == "cpsat":
        from .plan.cpsat import plan_cpsat
        t = time.perf_counter()
        plan, pred, bound, status = plan_cpsat(program, sizes, costs, budget, time_limit_s=a.time_limit,
                                               hint=greedy, log=_log)
        extra.update(lower_bound_s=bound, status=status, cpsat_s=time.perf_counter() - t)
        words = dict(bound_s=bound, status=status, greedy_s=greedy[1].latency_s)
    print(f"{a.model} on {prof.key['device']}, units of at most {fmt_bytes(prof.max_unit)}:")
    print(describe(program, sizes, costs, plan, pred, **words))
    if a.json:
        write_plan_file(a.json, plan, program, prof.max_unit, model=a.model, weights=str(weights), device=a.device,
                        predicted_latency_s=pred.latency_s, predicted_stall_s=pred.stall_s,
                        predicted_peak_bytes=pred.peak_bytes, **extra)
        _log(f"plan written to {a.json}: stream(model, weights, budget, plan={a.json!r}) carries it out "
             f"(units of at most {prof.max_unit} bytes merged along root_order, the cut the profile ran)")
    return 0


def cmd_pack(a) -> int:
    import os

    from .models import resolve
    from .pack import describe, pack, pack_folder

    spec = resolve(a.model) if a.model else None
    if spec is None and os.path.isfile(os.path.join(a.src, "config.json")):
        try:  # a Hugging Face folder names its own model: order by a real call of it
            spec = resolve(a.src)
        except LayerstreamError as e:
            _log(f"not ordering by the model ({e}); packing in name order")
    shown = [-1]

    def progress(done: int, total: int) -> None:
        pct = done * 100 // max(total, 1)
        if pct >= shown[0] + 5 or done == total:
            shown[0] = pct
            _log(f"packing {a.src}: {pct}% ({done / 1e6:.0f} / {total / 1e6:.0f} MB)")

    fn = pack_folder if os.path.isdir(a.src) else pack
    r = fn(a.src, a.out, spec=spec, dtype=a.dtype, quantize=a.quantize, force=a.force, progress=progress,
           **({"max_unit": a.max_unit} if a.max_unit else {}))
    print(describe(r))
    return 0


def cmd_demo(a) -> int:
    """The front door: a zoo model streamed at 10% of its weights beside the eager model."""
    a.model, a.budget, a.json = a.model, [a.budget], None
    _log(f"layerstream demo: {a.model} streamed at {a.budget[0]} of its weights, beside the eager model.\n"
         "Each configuration runs in a fresh process so peak RSS is its own.")
    return cmd_bench(a)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="layerstream", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(q):
        q.add_argument("model", help="zoo:NAME (e.g. zoo:resnet50) or package.module:function returning a ModelSpec")
        q.add_argument("--weights", help="safetensors file (default: the model's seed-0 weights, made once and cached)")
        q.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")

    q = sub.add_parser("run", help="stream a model and print its report")
    model_args(q)
    q.add_argument("--budget", default="10%", help="weight memory: bytes, '512MB', '1.5GiB' or '10%%' (default 10%%)")
    q.add_argument("--repeat", type=int, default=3, help="calls to run (default 3)")
    q.add_argument("--max-unit", type=lambda s: __import__("layerstream").parse_bytes(s), default=None,
                   help="largest load unit (default: an eighth of the budget)")
    q.add_argument("--reader", choices=["auto", "direct", "buffered"], default="auto")
    q.add_argument("--profile-cache", choices=["on", "off", "refresh"], default="on",
                   help="on: reuse a cost model cached by an earlier run (default); off: learn it and keep "
                        "nothing; refresh: learn it again and write over the cache")
    q.add_argument("--trace", help="write a Chrome trace (Perfetto) of the calls to this file")
    q.add_argument("--check", action="store_true", help="also run the eager model and compare outputs")
    q.set_defaults(fn=cmd_run)

    q = sub.add_parser("bench", help="eager and streamed side by side, each in a fresh process")
    model_args(q)
    q.description = "MODEL is a WORKLOAD.toml (as `layerstream session` reads) with --mode workload"
    q.add_argument("--budget", action="append", help="repeatable (default: 10%% and 25%%)")
    q.add_argument("--repeat", type=int, default=None,
                   help="warm calls per configuration (default 5); with --mode cold, cold starts (default 3)")
    q.add_argument("--json", help="write the results as JSON to this file")
    q.add_argument("--io", choices=["auto", "aio", "threads", "both"], default="auto",
                   help="I/O backend for the streamed runs; 'both' runs each budget with each")
    q.add_argument("--mode", choices=["warm", "cold", "workload"], default="warm",
                   help="warm: repeated calls (default); cold: weight file evicted from the page cache, the first "
                   "output timed from the start of loading (imports and building timed apart); workload: MODEL is "
                   "a WORKLOAD.toml, run as a Session (with --baselines: load-then-run per turn, eager if it fits)")
    q.add_argument("--baselines", action="store_true",
                   help="also run load-then-run, accelerate-disk and diffusers-group-disk (pip install -e '.[bench]')")
    q.add_argument("--results", metavar="MD", help="put this model's section (table, command) into this markdown "
                   "file, e.g. benchmarks/RESULTS.md, and draw its PNG beside it")
    q.set_defaults(fn=cmd_bench)

    q = sub.add_parser("tradeoff", help="the memory-latency frontier: predicted (and measured) latency per budget")
    model_args(q)
    q.add_argument("--profile-budget", default="25%", help="budget of the profiling calls (default 25%%)")
    q.add_argument("--steps", type=int, default=12, help="budgets to plan, minimum to whole model (default 12)")
    q.add_argument("--measure", action="store_true", help="also run each point, each in a fresh process, its "
                   "calls alternating with eager's (loaded beside it) so their ratio sees one host")
    q.add_argument("--repeat", type=int, default=3, help="warm calls per measured point (default 3)")
    q.add_argument("--json", help="write the frontier as JSON")
    q.add_argument("--png", help="draw the frontier to this PNG")
    q.add_argument("--refresh", action="store_true", help="measure the profile again even if one is cached")
    q.add_argument("--no-knee-fit", action="store_true", help="find the knee with the profile's costs only "
                   "(by default a stream at the knee fits them there, and the knee is found again: knee.py)")
    q.set_defaults(fn=cmd_tradeoff)

    def size(text: str) -> int:
        return __import__("layerstream").parse_bytes(text)

    q = sub.add_parser("profile", help="measure the cost model planning uses (cached per file, device, inputs)")
    model_args(q)
    q.add_argument("--budget", default="25%", help="budget streamed while measuring; sets the unit size "
                   "unless --max-unit is given (default 25%%)")
    q.add_argument("--max-unit", type=size, default=None, help="largest load unit (default: an eighth of the budget)")
    q.add_argument("--json", help="also write the profile (program, slot sizes, costs) as JSON to this file")
    q.add_argument("--refresh", action="store_true", help="measure again even if a cached profile matches")
    q.set_defaults(fn=cmd_profile)

    q = sub.add_parser("plan", help="plan a budget from the cached profile and print it in words")
    model_args(q)
    q.add_argument("--budget", required=True, help="weight memory: bytes, '512MB', '1.5GiB' or '10%%'")
    q.add_argument("--solver", choices=["greedy", "cpsat"], default="greedy",
                   help="greedy (milliseconds) or cpsat (OR-Tools: improves on greedy and proves a lower bound)")
    q.add_argument("--time-limit", type=float, default=10.0, help="CP-SAT's time limit in seconds (default 10)")
    q.add_argument("--max-unit", type=size, default=None, help="largest load unit (default: an eighth of the budget)")
    q.add_argument("--json", help="write the plan as JSON (Plan.from_json reads it; stream(..., plan=...) runs it)")
    q.add_argument("--refresh", action="store_true", help="measure the profile again even if one is cached")
    q.set_defaults(fn=cmd_plan)

    q = sub.add_parser("pack", help="rewrite a checkpoint in execution order, 4 KiB aligned, with checksums")
    q.add_argument("src", help="a safetensors file, or a Hugging Face folder (one or several shards)")
    q.add_argument("-o", "--out", required=True, help="the packed file (a folder if SRC is a folder)")
    q.add_argument("--model", help="zoo:NAME or package.module:function: order by one real call of it "
                   "(default: natural name order, grouped by module)")
    q.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="store floating tensors in this dtype (build the model in it too)")
    q.add_argument("--quantize", choices=["int8"],
                   help="store the model's linear weights as int8 with per-channel scales (needs the model): a "
                   "quarter of the bytes to read; the runtime dequantises each unit within the budget")
    q.add_argument("--max-unit", type=lambda s: __import__("layerstream").parse_bytes(s), default=None,
                   help="largest checksummed unit (default 16 MiB)")
    q.add_argument("--force", action="store_true", help="replace OUT if it exists")
    q.set_defaults(fn=cmd_pack)

    q = sub.add_parser("session", help="several models under one budget: run a workload file (TOML)")
    q.add_argument("workload", help="WORKLOAD.toml: [[model]] tables, budget, cycle or sequence, repeats")
    q.add_argument("--budget", help="instead of the file's: bytes, '512MB', or '25%%' of the largest model")
    q.add_argument("--repeats", type=int, help="instead of the file's repeats")
    q.add_argument("--json", help="write the per-model and total figures, and every cycle's latency, as JSON")
    q.add_argument("--check", action="store_true", help="compare each model's last output with its eager output")
    q.set_defaults(fn=lambda a: __import__("layerstream.session_cli", fromlist=["x"]).cmd_session(a))

    q = sub.add_parser("demo", help="stream a zoo model at 10%% of its weights beside the eager model")
    q.add_argument("--model", default="zoo:resnet50")
    q.add_argument("--weights", default=None)
    q.add_argument("--budget", default="10%")
    q.add_argument("--repeat", type=int, default=5)
    q.set_defaults(fn=cmd_demo)

    a = p.parse_args(argv)
    try:
        return a.fn(a)
    except (LayerstreamError, ValueError, FileNotFoundError) as e:
        print(f"layerstream {a.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
