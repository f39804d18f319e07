"""The frontier sweep (pure), and the profile, plan and tradeoff commands end to end on tiny models."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from layerstream import cli
from layerstream.plan.cost import CostModel, with_read_bytes
from layerstream.plan.greedy import plan_greedy, plan_greedy_many
from layerstream.plan.tradeoff import KNEE, sweep, with_knee
from layerstream.plan.types import min_budget
from layerstream.units import Program, Unit

PAGE = 4096


def _program():
    sizes = {i: PAGE * (1 if i < 6 else 8) for i in range(8)}  # sparse early units, dense late ones
    units = tuple(Unit(i, f"u{i}", (f"u{i}",), (f"t{i}",), sizes[i]) for i in range(8))
    costs = CostModel(tuple(0.01 if i < 6 else 0.001 for i in range(8)), 0.0, read_bps=PAGE / 0.004)
    return Program(units, tuple(range(8)), ()), sizes, costs


def test_sweep_spans_minimum_to_whole_model_and_finds_the_knee():
    program, sizes, costs = _program()
    f = sweep(program, sizes, costs, steps=6)
    budgets = [p.budget_bytes for p in f.points]
    assert budgets == sorted(budgets) and len(set(budgets)) == len(budgets)
    assert budgets[0] == min_budget(program, sizes)[0] and budgets[-1] == sum(sizes.values())
    assert f.points[-1].streamed_bytes == 0 and abs(f.points[-1].predicted_ms - f.compute_ms) < 1e-9
    assert all(p.arena_bytes <= p.budget_bytes for p in f.points)
    assert all(p.predicted_ms >= f.compute_ms - 1e-9 for p in f.points)
    assert f.points[0].predicted_ms > KNEE * f.compute_ms  # at the minimum, dense reads cannot hide
    knee = f.knee_point
    assert knee.predicted_ms <= KNEE * f.compute_ms
    assert all(p.predicted_ms > KNEE * f.compute_ms for p in f.points if p.budget_bytes < f.knee_bytes)


def test_tradeoff_command_writes_table_json_and_png(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
    assert cli.main(["tradeoff", "zoo:tiny-bert", "--steps", "4", "--json", str(out_json), "--png", str(out_png)]) == 0
    table = capsys.readouterr().out
    assert "| budget |" in table and "knee" in table
    d = json.loads(out_json.read_text())
    assert len(d["points"]) >= 4 and d["points"][-1]["streamed_bytes"] == 0
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_counts_the_bytes_read_and_bounds_by_them():
    # The dense units 6 and 7 are int8: 2 of their 8 slot pages are read. Every point's streamed
    # bytes are the bytes its loads read, its bound never exceeds its prediction, and the slots
    # (memory) are unchanged: the whole model is still every slot's bytes.
    program, sizes, costs = _program()
    costs = with_read_bytes(costs, sizes, {6: 2 * PAGE, 7: 2 * PAGE})
    f = sweep(program, sizes, costs, steps=6)
    assert f.weight_bytes == sum(sizes.values()) and f.points[0].budget_bytes == min_budget(program, sizes)[0]
    plans = plan_greedy_many(program, sizes, costs, [p.budget_bytes for p in f.points])
    for p, (plan, _) in zip(f.points, plans):
        assert p.streamed_bytes == sum(2 * PAGE if u >= 6 else sizes[u] for u, _ in plan.loads)
        assert p.bound_ms <= p.predicted_ms * (1 + 1e-9)
    read = sum(2 * PAGE if u >= 6 else sizes[u] for u in program.steps)
    assert f.points[0].streamed_bytes == read  # the minimum budget streams every unit


def test_calibration_finds_how_much_compute_and_disk_slowed_each_other():
    # A call timed under the fill plan with compute 1.5x slower while the disk reads and the disk 1.75x
    # slower while compute runs: from the serial call's compute and the disk's speed alone, `calibrate`
    # recovers both slowdowns, and plans with them.
    from layerstream.plan import plan_fill
    from layerstream.plan.calibrate import calibrate
    from layerstream.plan.simulate import timeline
    mb = 2**20  # eight 1 MiB units of 1 ms compute each, read alone at 1 GB/s (1 ms each)
    units = tuple(Unit(i, f"u{i}", (f"u{i}",), (f"t{i}",), mb) for i in range(8))
    program, sizes = Program(units, tuple(range(8)), ()), {i: mb for i in range(8)}
    pure = CostModel((0.001,) * 8, 0.0005, read_bps=1e9)
    plan = plan_fill(program, sizes, 4 * mb)
    assert plan.loads
    true = replace(pure, read_slowdown=0.5, disk_slowdown=0.75)
    tl = timeline(program, sizes, true, plan, calls=1)
    assert tl.compute_s > pure.compute_total_s  # some reads overlapped compute
    costs = calibrate(program, sizes, pure, plan, tl.latency_s, tl.compute_s)
    assert abs(costs.read_slowdown - 0.5) < 0.01 and abs(costs.disk_slowdown - 0.75) < 0.01
    assert costs.compute_s == pure.compute_s and costs.read_bps == pure.read_bps
    # a timed call that computed no longer than the serial one, and took no longer than compute and
    # the disk alone explain: no slowdown (never negative)
    alone = timeline(program, sizes, pure, plan, calls=1)
    none = calibrate(program, sizes, pure, plan, alone.latency_s, pure.compute_total_s * 0.9)
    assert none.read_slowdown == 0.0 and none.disk_slowdown == 0.0 and none.read_bps == pure.read_bps
    assert CostModel.from_json(costs.to_json()) == costs
    # A warm call (steady state) of a disk-bound plan (0.4 ms of compute a step) whose disk ran at 1.6
    # GB/s, where the serial call measured 1 GB/s (a host caching what every call re-reads): no
    # slowdown of the 1 GB/s disk makes it that short, so with `most_bps` the disk is fitted faster,
    # up to that limit; without, it stays as measured.
    quick = replace(pure, compute_s=(0.0004,) * 8)
    fast = timeline(program, sizes, replace(quick, read_bps=1.6e9), plan, calls=3)
    warm = calibrate(program, sizes, quick, plan, fast.latency_s, fast.compute_s, calls=3, most_bps=4e9)
    assert abs(warm.read_bps - 1.6e9) < 0.01e9 and warm.read_slowdown == warm.disk_slowdown == 0.0
    assert calibrate(program, sizes, quick, plan, fast.latency_s, fast.compute_s, calls=3).read_bps == 1e9
    assert calibrate(program, sizes, quick, plan, fast.latency_s, fast.compute_s, calls=3,
                     most_bps=1.2e9).read_bps == 1e9  # 1.2 GB/s does not explain it: the disk stays
    # A compute-bound warm call that computed 3% faster than the serial call: no disk explains it, so
    # none is fitted (a 4 GB/s disk once was, from such a call).
    slow = replace(pure, compute_s=(0.005,) * 8)
    calm = timeline(program, sizes, slow, plan, calls=3)
    assert calm.latency_s < slow.compute_total_s * 1.05  # compute-bound
    kept = calibrate(program, sizes, slow, plan, calm.latency_s * 0.97, calm.compute_s * 0.97, calls=3, most_bps=4e9)
    assert kept.read_bps == 1e9


def test_sweep_frontier_never_rises_with_the_budget():
    program, sizes, costs = _program()
    f = sweep(program, sizes, costs, steps=9)
    predicted = [p.predicted_ms for p in f.points]
    assert all(b <= a for a, b in zip(predicted, predicted[1:])), predicted


# ---- profile cache, `layerstream profile` and `layerstream plan` ----------------------------------

def test_profile_command_measures_once_then_reads_the_cache(tmp_path, capsys, monkeypatch):
    import os

    from layerstream.profile import Profile, cache_root

    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "p.json"
    assert cli.main(["profile", "zoo:tiny-t5", "--max-unit", "16KiB", "--json", str(out)]) == 0
    first = capsys.readouterr()
    assert "measured in" in first.out and "call 3 (timing each step with reads serial" in first.err  # progress on stderr
    files = list(cache_root().glob("tiny-t5-*.json"))
    assert len(files) == 1 and out.read_text() == files[0].read_text()
    prof = Profile.from_json(out.read_text())
    assert prof.max_unit == 16384 and prof.key["max_unit"] == 16384 and prof.key["device"] == "cpu"
    assert len(prof.costs.compute_s) == len(prof.program.steps) > 10
    assert set(prof.sizes) == {u.uid for u in prof.program.units} and Profile.from_json(prof.to_json()) == prof
    assert cli.main(["profile", "zoo:tiny-t5", "--max-unit", "16KiB"]) == 0
    assert "cached" in capsys.readouterr().out
    # A rewritten weight file (here: only its mtime) is another file: measured again, cached apart.
    weights = prof.key["weights"]["path"]
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cli.main(["profile", "zoo:tiny-t5", "--max-unit", "16KiB"]) == 0
    assert "measured in" in capsys.readouterr().out
    assert len(list(cache_root().glob("tiny-t5-*.json"))) == 2
    # Another unit size is another cut: another profile.
    assert cli.main(["profile", "zoo:tiny-t5", "--max-unit", "32KiB"]) == 0
    assert "measured in" in capsys.readouterr().out


def test_profile_cache_key_names_what_the_costs_depend_on(tmp_path):
    from layerstream.profile import cache_path, weight_identity

    w = tmp_path / "w.safetensors"
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    w.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    ident = weight_identity(w)
    assert ident["bytes"] == 8 + len(header) + 4 and ident["path"] == str(w.resolve())
    key = {"version": 1, "model": "m", "weights": ident, "device": "cpu", "inputs": [[[1, 8], "torch.int64"]],
           "max_unit": 4096, "reader": "auto"}
    for change in ({"device": "cuda:0:NVIDIA H100"}, {"inputs": [[[2, 8], "torch.int64"]]}, {"max_unit": 8192}):
        assert cache_path({**key, **change}) != cache_path(key)
    other = header.replace(b"F32", b"I32")  # same size, another header: another file
    w.write_bytes(len(other).to_bytes(8, "little") + other + b"\0" * 4)
    assert weight_identity(w)["header_sha256"] != ident["header_sha256"]


def test_plan_command_prints_the_plan_and_writes_json_that_plan_reads(tmp_path, capsys, monkeypatch):
    from layerstream.plan import Plan
    from layerstream.profile import Profile, cache_root

    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan.json"
    args = ["plan", "zoo:tiny-t5", "--budget", "30%", "--max-unit", "16KiB", "--json", str(out)]
    assert cli.main(args) == 0  # profiles first (nothing cached)
    text = capsys.readouterr().out
    assert "plan (" in text and "resident:" in text and "ring:" in text and "predicted warm latency" in text
    d = json.loads(out.read_text())
    plan = Plan.from_json(out.read_text())
    prof = Profile.from_json(next(cache_root().glob("tiny-t5-*.json")).read_text())
    plan.validate(prof.sizes)
    assert plan.arena_bytes <= plan.budget_bytes == d["budget_bytes"] and d["max_unit"] == 16384
    assert d["predicted_latency_s"] >= prof.costs.compute_total_s * (1 - 1e-9)  # (sums in another order)
    assert d["predicted_peak_bytes"] <= plan.arena_bytes
    assert prof.program.root_order == d["root_order"]
    pytest.importorskip("ortools")
    assert cli.main(args[:-2] + ["--solver", "cpsat", "--time-limit", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lower bound" in text and "greedy" in text
    d = json.loads(out.read_text())
    assert d["planner"] in ("cpsat", "greedy", "fill") and d["status"] in ("optimal", "feasible", "unknown")
    assert d["lower_bound_s"] <= d["predicted_latency_s"] <= d["greedy_latency_s"]
    assert cli.main(["plan", "zoo:tiny-t5", "--budget", "1KiB", "--max-unit", "16KiB"]) == 2
    assert "below the minimum" in capsys.readouterr().err


def test_stream_carries_out_a_plan_file_exactly(tmp_path, monkeypatch):
    """`layerstream plan --json` -> stream(plan=file): the profiled cut is rebuilt and the plan kept."""
    import torch

    import layerstream as ls
    from layerstream import zoo
    from layerstream.outputs import tensors_of
    from layerstream.plan import Plan

    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "zoo:tiny-t5", "--budget", "30%", "--max-unit", "16KiB", "--json", str(out)]) == 0
    spec, weights = zoo.get("tiny-t5"), zoo.weights_path("tiny-t5")
    with torch.no_grad():
        want = tensors_of(ls.load_eager(zoo.build_on_meta(spec.build), weights)(*spec.example_inputs()))
    with ls.stream(zoo.build_on_meta(spec.build), weights, budget="30%", plan=str(out)) as sm:
        for _ in range(4):
            got = tensors_of(sm(*spec.example_inputs()))
            assert all(torch.equal(g, w) for g, w in zip(got, want))
        assert sm.plan == Plan.from_json(out.read_text()) and sm.max_unit == 16384
        assert sm.report().demand_misses == 0  # the plan's units are the ones the calls ask for
    with pytest.raises(ls.PlanError, match="16384"):
        ls.stream(zoo.build_on_meta(spec.build), weights, budget="30%", plan=str(out), max_unit=32768)


def test_the_knee_is_found_between_the_sweeps_budgets():
    """Bisection puts the knee within 0.5% of the smallest budget greedy predicts within KNEE x compute."""
    program, sizes, costs = _program()
    coarse = sweep(program, sizes, costs, steps=3)
    knee = coarse.knee_point
    assert knee.predicted_ms <= KNEE * coarse.compute_ms
    below = coarse.points[coarse.points.index(knee) - 1]
    assert below.predicted_ms > KNEE * coarse.compute_ms
    step = max(4096, knee.budget_bytes // 200)
    _, pred = plan_greedy(program, sizes, costs, knee.budget_bytes - step)
    assert pred.latency_s > KNEE * costs.compute_total_s  # a step less is no longer within
    fine = sweep(program, sizes, costs, steps=12)
    assert abs(fine.knee_bytes - coarse.knee_bytes) <= step  # the same knee, whatever the grid


def test_tradeoff_measure_runs_every_point_and_eager_in_fresh_processes(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    out_json = tmp_path / "f.json"
    assert cli.main(["tradeoff", "zoo:tiny-bert", "--steps", "3", "--measure", "--repeat", "1",
                     "--json", str(out_json)]) == 0
    table = capsys.readouterr().out
    d = json.loads(out_json.read_text())
    assert d["eager_ms"] > 0 and all(p["measured_ms"] > 0 and p["eager_ms"] > 0 for p in d["points"])
    assert "eager measured" in table and "alternating" in table
    assert d["knee_bytes"]  # the whole model is always within KNEE x compute: there is always a knee
    assert "(knee)" in table and "x eager" in table


def test_with_knee_puts_the_knee_found_by_other_costs_among_the_profiles_points():
    """The knee from costs fitted elsewhere (here: compute twice as slow while the disk reads, so it sits
    higher: at the whole model) replaces the point of its budget and is the knee; every other point is
    the profile's, in budget order."""
    program, sizes, costs = _program()
    frontier = sweep(program, sizes, costs, steps=6)
    found = sweep(program, sizes, replace(costs, read_slowdown=1.0), steps=6)
    assert frontier.knee_bytes < found.knee_bytes == frontier.points[-1].budget_bytes
    merged = with_knee(frontier, found, fitted_at=frontier.knee_bytes)
    knee = merged.knee_point
    assert merged.knee_bytes == found.knee_bytes and knee.fitted_at == frontier.knee_bytes
    assert knee == replace(found.knee_point, fitted_at=frontier.knee_bytes)
    others = [p for p in merged.points if p is not knee]
    assert others == [p for p in frontier.points if p.budget_bytes != knee.budget_bytes]
    assert [p.budget_bytes for p in merged.points] == [p.budget_bytes for p in frontier.points]
    assert merged.compute_ms == frontier.compute_ms and merged.knee_compute_ms == found.compute_ms
    assert merged.profile_knee_bytes == frontier.knee_bytes
    assert with_knee(frontier, replace(found, knee_bytes=None), 1) == frontier
