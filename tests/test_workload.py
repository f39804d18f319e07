"""The workload planner and the call predictor (pure): how a session splits its budget between models."""
from __future__ import annotations

import random

import pytest

import layerstream as ls
from layerstream.plan.cost import CostModel
from layerstream.plan.simulate import simulate
from layerstream.plan.workload import ModelDemand, Predictor, min_session_budget, plan_workload
from layerstream.units import Program, Unit

PAGE = 4096


def program(n_units: int, pinned: int = 0) -> Program:
    units = tuple(Unit(i, f"u{i}", (f"m{i}",), (), PAGE, pinned=i < pinned) for i in range(n_units))
    return Program(units, tuple(range(pinned, n_units)), ())


def demand(name, n_units=4, weight=1.0, costs=None, pinned=0, unit_pages=1) -> ModelDemand:
    return ModelDemand(name, program(n_units, pinned), {i: unit_pages * PAGE for i in range(n_units)}, weight, costs)


def check_plans(wp, models):
    plans = wp.plans(models)
    spans = []
    for m in models:
        p = plans[m.name]
        p.validate(m.sizes)
        assert p.ring_offset == plans[models[0].name].ring_offset and p.ring_bytes == wp.ring_bytes
        spans += [(off, off + m.sizes[u]) for u, off in p.resident]
        assert {u for u, _ in p.resident} | {u for u, _ in p.loads} >= set(m.program.steps)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "resident regions overlap"
    assert plans[models[0].name].arena_bytes <= wp.budget_bytes
    return plans


def test_workload_bytes_rule_gives_the_frequent_model_its_bytes_first():
    models = [demand("cold", weight=1), demand("hot", weight=3)]
    wp = plan_workload(models, budget=5 * PAGE)  # a ring of three units, two resident
    assert wp.planner == "bytes" and wp.ring_bytes == 3 * PAGE
    assert dict(wp.resident) == {"cold": (), "hot": (0, 1)}
    check_plans(wp, models)


def test_workload_minimum_is_pinned_plus_the_largest_unit():
    models = [demand("a", n_units=3, pinned=1), demand("b", n_units=3, unit_pages=2)]
    need, why = min_session_budget(models)
    assert need == PAGE + 2 * PAGE and "must fit the shared ring" in why
    with pytest.raises(ls.BudgetError) as e:
        plan_workload(models, need - 1)
    assert e.value.minimum_bytes == need and f"at least {need} bytes" in str(e.value)
    wp = plan_workload(models, need)
    assert dict(wp.resident) == {"a": (0,), "b": ()} and wp.ring_bytes == 2 * PAGE
    check_plans(wp, models)


def test_workload_cost_planner_gives_bytes_to_the_read_bound_model():
    bps = PAGE / 1e-3  # a page per millisecond
    busy = CostModel((10e-3,) * 4, 0.0, bps)  # 10 ms of compute per unit hides every read
    idle = CostModel((0.1e-3,) * 4, 0.0, bps)  # reads are the whole call
    models = [demand("a_busy", costs=busy), demand("b_idle", costs=idle)]
    budget = 6 * PAGE
    wp = plan_workload(models, budget)
    plans = check_plans(wp, models)
    assert wp.planner == "cost"
    assert len(dict(wp.resident)["b_idle"]) > len(dict(wp.resident)["a_busy"])
    bytes_plan = plan_workload([ModelDemand(m.name, m.program, m.sizes, m.weight) for m in models], budget)
    bplans = bytes_plan.plans(models)
    total = sum(simulate(m.program, m.sizes, m.costs, plans[m.name]).latency_s for m in models)
    total_bytes = sum(simulate(m.program, m.sizes, m.costs, bplans[m.name]).latency_s for m in models)
    assert total < total_bytes


def test_predictor_cycle_resync_and_learned_successors():
    p = Predictor(("a", "b", "a", "c"))
    assert p.expect() == "a"
    assert p.observe("a") and p.expect() == "b"
    assert p.observe("b") and p.expect() == "a"
    assert not p.observe("c") and p.expect() == "a"  # out of order: resynchronised after c
    assert p.weights(["a", "b", "c"]) == {"a": 2.0, "b": 1.0, "c": 1.0}
    once = Predictor(("a", "b"), cycle=False)
    for n in ["a", "b", "a"]:
        once.observe(n)
    assert once.expect() == "b"  # past the end: the successor seen after a
    learned = Predictor()
    assert learned.expect() is None and learned.observe("x")
    for n in ["y", "x", "z", "x", "y", "x"]:
        learned.observe(n)
    assert learned.expect() == "y"  # after x: y twice, z once
    assert learned.weights(["x", "y", "z", "w"]) == {"x": 5.0, "y": 3.0, "z": 2.0, "w": 1.0}
    assert Predictor(frequency={"x": 3}).weights(["x", "y"]) == {"x": 3.0, "y": 1.0}


def test_workload_plans_fit_any_budget_above_the_minimum():
    rng = random.Random(5)
    for trial in range(60):
        models = []
        for i in range(rng.randint(1, 4)):
            n = rng.randint(1, 8)
            pinned = rng.randint(0, 1)
            units = tuple(Unit(u, f"u{u}", (f"m{u}",), (), PAGE, pinned=u < pinned) for u in range(n))
            steps = tuple(rng.choice(range(pinned, n)) if rng.random() < 0.2 else u for u in range(pinned, n))
            if pinned and rng.random() < 0.5:
                steps = (0,) + steps  # a pinned unit's root runs too (it stays resident)
            sizes = {u: PAGE * rng.randint(1, 6) for u in range(n)}
            costs = None
            if trial % 2:
                costs = CostModel(tuple(rng.uniform(0, 2e-3) for _ in steps), 0.0, PAGE / rng.uniform(1e-4, 1e-3))
            if steps:
                models.append(ModelDemand(f"m{i}", Program(units, steps, ()), sizes, rng.uniform(0.5, 3), costs))
        if not models:
            continue
        need, _ = min_session_budget(models)
        budget = need + rng.randint(0, 40) * rng.choice([1, PAGE, PAGE + 1])
        wp = plan_workload(models, budget)
        plans = check_plans(wp, models)
        for m in models:
            loads = [m.sizes[u] for u, _ in plans[m.name].loads]
            assert not loads or max(loads) <= wp.ring_bytes
