"""The frontier sweep (pure) and the tradeoff command end to end on a tiny model."""
from __future__ import annotations

import json

from layerstream import cli
from layerstream.plan.cost import CostModel
from layerstream.plan.tradeoff import KNEE, sweep
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
    knee = next(p for p in f.points if p.budget_bytes == f.knee_bytes)
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


def test_read_tax_is_the_compute_that_reading_cost():
    from layerstream.plan.cost import with_read_tax
    pure = CostModel((0.1, 0.2), 0.0, read_bps=1e9)
    overlapped = CostModel((0.15, 0.25), 0.0, read_bps=2e9)  # 0.1 s more while reading 100 MB
    costs = with_read_tax(overlapped, pure, 100 * 10**6)
    assert costs.compute_s == (0.1, 0.2) and costs.read_bps == 2e9
    assert abs(costs.read_tax_s_per_byte - 1e-9) < 1e-18
    assert abs(costs.compute_scale(100 * 10**6) - (1 + 0.1 / 0.3)) < 1e-12
    assert costs.compute_scale(0) == 1.0
    assert with_read_tax(pure, overlapped, 10**6).read_tax_s_per_byte == 0.0  # never negative
    assert CostModel.from_json(costs.to_json()) == costs
