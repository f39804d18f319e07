"""Streamed output equals eager output bit for bit, on every tiny architecture, at many budgets."""
from __future__ import annotations

import json

import pytest
import torch

import layerstream as ls
from conftest import TINY, open_fds, reader_threads

SMALL_UNIT = 16 * 1024  # far below the tiny models' sizes, so each is cut into many units


def minimum(saved_model, max_unit: int) -> int:
    with pytest.raises(ls.BudgetError) as e:
        ls.stream(saved_model.model(), saved_model.path, budget=1, max_unit=max_unit)
    return e.value.minimum_bytes


def run_and_check(s, budget, max_unit, calls=3) -> ls.Report:
    with ls.stream(s.model(), s.path, budget=budget, max_unit=max_unit) as sm:
        for _ in range(calls):
            s.check(sm(*s.inputs))
        r = sm.report()
    assert r.arena_bytes <= r.budget_bytes
    assert r.arena_peak_bytes <= r.budget_bytes
    return r


def budget_at(s, share, max_unit=SMALL_UNIT) -> int:
    """`share` of the weights, raised to the minimum budget where the share is below it."""
    return max(ls.parse_budget(share, s.weight_bytes), minimum(s, max_unit))


def run_at(s, share, max_unit) -> ls.Report:
    """Run at `share` of the weights, or at the minimum if the share is below it for this cut."""
    budget = minimum(s, max_unit) if share == "min" else share
    try:
        return run_and_check(s, budget, max_unit)
    except ls.BudgetError as e:
        assert share != "min" and e.minimum_bytes > ls.parse_budget(share, s.weight_bytes)
        return run_and_check(s, e.minimum_bytes, max_unit)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("share", ["min", "25%", "50%", "100%"])
def test_streamed_equals_eager(saved, name, share):
    r = run_at(saved(name), share, SMALL_UNIT)
    if share == "min":
        assert r.loads_per_call > 0, "at the minimum budget something must stream"


@pytest.mark.parametrize("name", TINY)
def test_default_unit_size(saved, name):
    run_at(saved(name), "10%", None)


def test_one_byte_below_minimum_fails_and_minimum_runs(saved):
    s = saved("tiny-gpt2")
    need = minimum(s, SMALL_UNIT)
    with pytest.raises(ls.BudgetError, match="below the minimum"):
        ls.stream(s.model(), s.path, budget=need - 1, max_unit=SMALL_UNIT)
    r = run_and_check(s, need, SMALL_UNIT)
    assert r.arena_peak_bytes <= need


def test_tied_weights_stay_tied(saved):
    s = saved("tiny-gpt2")
    model = s.model()
    assert model.lm_head.weight is model.transformer.wte.weight
    with ls.stream(model, s.path, budget=budget_at(s, "30%"), max_unit=SMALL_UNIT) as sm:
        s.check(sm(*s.inputs))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.is_meta  # close() gives the model back its meta tensors


def test_module_called_twice_loads_twice(saved):
    s = saved("twice")
    with ls.stream(s.model(), s.path, budget=minimum(s, SMALL_UNIT), max_unit=SMALL_UNIT) as sm:
        for _ in range(3):
            s.check(sm(*s.inputs))
        block_units = [u.uid for u in sm.cap.program.units if any(r.startswith("block") for r in u.roots)]
        steps = sm.cap.program.steps
        assert all(steps.count(u) == 2 for u in block_units)  # the recorded order has both calls
        assert any(u.pinned for u in sm.cap.program.units)  # `scale`, owned beside the children
        assert sm.report().demand_misses > 0  # the first call followed the registration-order guess


def test_warm_calls_have_no_demand_misses(saved):
    s = saved("tiny-bert")
    with ls.stream(s.model(), s.path, budget=budget_at(s, "30%"), max_unit=SMALL_UNIT) as sm:
        sm(*s.inputs)
        misses = sm.report().demand_misses
        for _ in range(3):
            s.check(sm(*s.inputs))
        assert sm.report().demand_misses == misses
        assert sm.report().bytes_read_last_call > 0


class Branchy(torch.nn.Module):
    """Data-dependent control flow: which branch runs depends on the input's sign."""

    def __init__(self, d=64):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.a = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Linear(d, d))
        self.b = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.Linear(d, d))
        self.out = torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.inp(x)
        h = self.a(h) if x.sum() > 0 else self.b(h)
        return self.out(h)


def test_data_dependent_branch_stays_correct(tmp_path):
    from safetensors.torch import save_model
    torch.manual_seed(0)
    ref = Branchy().eval()
    save_model(ref, str(tmp_path / "b.safetensors"))
    with ls.init_empty_weights():
        model = Branchy().eval()
    pos, neg = torch.ones(1, 64), -torch.ones(1, 64)
    with ls.stream(model, tmp_path / "b.safetensors", budget="40%", max_unit=20000) as sm:
        for x in [pos, pos, neg, pos, neg, neg]:
            with torch.no_grad():
                assert torch.equal(sm(x), ref(x))
        assert sm.report().demand_misses > 0
        assert sm.report().arena_peak_bytes <= sm.report().budget_bytes


@pytest.mark.parametrize("io", ["aio", "threads"])
def test_close_leaves_no_thread_or_fd(saved, io):
    s = saved("tiny-vit")
    fds, threads = open_fds(), reader_threads()
    sm = ls.stream(s.model(), s.path, budget=budget_at(s, "25%"), max_unit=SMALL_UNIT, io=io)
    s.check(sm(*s.inputs))
    assert sm.report().reader == f"direct/{io}"
    assert bool(reader_threads()) == (io == "threads")  # kernel AIO needs no reader thread
    sm.close()
    assert reader_threads() == threads
    assert open_fds() == fds
    with pytest.raises(ls.ClosedError):
        sm(*s.inputs)


def test_trace_exports_chrome_json(saved, tmp_path):
    s = saved("tiny-gpt2")
    with ls.stream(s.model(), s.path, budget=budget_at(s, "30%"), max_unit=SMALL_UNIT) as sm:
        sm(*s.inputs)
        sm.trace.save_chrome(str(tmp_path / "t.json"))
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    cats = {e.get("cat") for e in events}
    assert {"read", "compute"} <= cats
    assert all(e["dur"] >= 0 for e in events if e["ph"] == "X")


def test_report_prints(saved):
    s = saved("tiny-resnet")
    with ls.stream(s.model(), s.path, budget=budget_at(s, "50%"), max_unit=SMALL_UNIT) as sm:
        sm(*s.inputs)
        text = str(sm.report())
    assert "demand misses" in text and "arena" in text


def test_the_learning_calls_start_with_nothing_read_ahead(saved):
    # The timed call is fitted as a first call (an empty ring) and the serial call times the disk alone,
    # so neither may begin with loads the previous call's end issued for it.
    s = saved("tiny-gpt2")
    with ls.stream(s.model(), s.path, budget="50%", max_unit=SMALL_UNIT, profile_cache="off") as sm:
        seen = []
        for _ in range(3):
            s.check(sm(*s.inputs))
            seen.append((sm._learning, len(sm._exec.inflight), sm._exec.serial))
        assert sm.plan.loads and sm.costs is not None
    assert seen[0] == ("overlapped", 0, False)  # about to be timed
    assert seen[1] == ("pure", 0, True)  # about to run serially
    # then the plan's warm calls are fitted, greedy's re-plan's or the plan kept: their first starts empty
    assert seen[2] == ("settle", 0, False)
