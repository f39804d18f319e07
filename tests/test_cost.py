"""The cost model (pure): its JSON form, per-unit read bytes, and the costs one recorded call gives."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstream.plan.cost import CostModel, costs_from_record, least_compute, with_read_bytes
from layerstream.units import Program, Unit

P = 4096  # one page


def _fast(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.too_slow])


finite = st.floats(0.0, 1e6, allow_nan=False, allow_infinity=False)


@_fast(100)
@given(st.lists(finite, max_size=50), finite, st.floats(1.0, 1e12), finite,
       st.dictionaries(st.integers(0, 10**4), st.integers(0, 2**40), max_size=8))
def test_cost_model_round_trips_through_json(compute, pre, bps, lat, reads):
    costs = CostModel(tuple(compute), pre, bps, lat, read_bytes=tuple(sorted(reads.items())))
    back = CostModel.from_json(costs.to_json())
    assert back == costs and isinstance(back.compute_s, tuple)
    assert all(isinstance(x, tuple) for x in back.read_bytes)
    assert back.read_s(4096) == costs.read_s(4096) and back.compute_total_s == costs.compute_total_s
    for u, n in reads.items():
        assert back.unit_read_bytes(u, 4096) == n and back.read_s(back.unit_read_bytes(u, 4096)) == costs.read_s(n)
    assert back.unit_read_bytes(10**4 + 1, 4096) == 4096  # not listed: reads its slot


def test_cost_model_json_from_before_read_bytes_loads():
    old = json.dumps({"compute_s": [0.5, 0.25], "pre_s": 0.125, "read_bps": 1e9, "read_lat_s": 1e-4,
                      "read_tax_s_per_byte": 2e-10})
    costs = CostModel.from_json(old)
    assert costs.compute_s == (0.5, 0.25) and costs.pre_s == 0.125 and costs.read_bytes == ()
    # the tax was a cost per byte read: 0.2 of each second of reading, a slowdown of 0.25 while reading
    x = costs.read_slowdown
    assert abs(x - 0.25) < 1e-12 and abs(x / (1 + x) / costs.read_bps - 2e-10) < 1e-22
    assert costs.read_sizes({0: P, 1: 2 * P}) == {0: P, 1: 2 * P}


def test_with_read_bytes_drops_slot_sized_entries_and_refuses_nonsense():
    costs = CostModel((0.5,), 0.0, read_bps=1e9)
    sizes = {0: 4 * P, 1: 512 * P, 2: P}
    listed = with_read_bytes(costs, sizes, {2: 2 * P, 1: 3000, 0: 4 * P})
    assert listed.read_bytes == ((1, 3000), (2, 2 * P))  # sorted; unit 0 reads its slot: dropped
    assert listed.read_sizes(sizes) == {0: 4 * P, 1: 3000, 2: 2 * P}  # a gather unit may read past its slot
    assert with_read_bytes(listed, sizes, {}) == costs  # replaces, never merges
    with pytest.raises(ValueError, match="unit 7"):
        with_read_bytes(costs, sizes, {7: P})
    with pytest.raises(ValueError, match="bytes >= 0"):
        with_read_bytes(costs, sizes, {0: -1})


# ---- costs_from_record -----------------------------------------------------------------------------

S = 10**9  # ns per second
T0 = 7 * S  # the call's start, ns


def _recorded_program():
    # emb (unit 0), a merged unit 1 over two roots (b0, b1), head (unit 2); the top module "" owns none.
    units = (Unit(0, "emb", ("emb",), (), 0), Unit(1, "b0+b1", ("b0", "b1"), (), 0), Unit(2, "head", ("head",), (), 0))
    root_units = {"": [], "emb": [0], "b0": [1], "b1": [1], "head": [2]}
    return Program(units, (0, 1, 2), ()), root_units


# (root path, pre-hook start, weights ready), ns after T0
RECORD = [("", 0, 0),
          ("emb", S // 4, S // 2),  # the first step starts at 0.25 s: pre = 0.25
          ("b0", 3 * S // 2, 7 * S // 4),  # waits 0.25 s for its weights: not compute
          ("b1", 2 * S, 2 * S),  # unit 1's second root: the same step
          ("head", 3 * S, 4 * S)]


def test_costs_from_record_exact():
    # emb: ready 0.5, next step starts 1.5 -> 1.0 s. unit 1: ready 1.75, head starts 3.0 -> 1.25 s
    # (its second root b1 is part of it). head: ready 4.0, the call ends at 4.5 -> 0.5 s. pre 0.25 s.
    # Each root's pre-hook tops up kernel AIO: unit 1's step twice (b0, b1), the others once (the top
    # module's pre-hook comes before the first step: the pre's).
    prog, root_units = _recorded_program()
    rec = [(p, T0 + a, T0 + b) for p, a, b in RECORD]
    costs = costs_from_record(prog, root_units, rec, T0, T0 + 9 * S // 2, read_bps=5e8)
    assert costs == CostModel((1.0, 1.25, 0.5), 0.25, 5e8, refills=(1, 2, 1))
    assert costs.compute_total_s == 3.0


def test_costs_from_record_times_row_blocks_by_their_own_acquires():
    # A linear "fc" cut into row blocks (units 1 and 2) between emb (0) and head (3). Its forward acquires
    # the blocks itself: block 1 at 1.25 s (ready 1.5), block 2 at 2.0 s, ready only at 2.75 (a 0.75 s
    # read wait), head at 3.0 (ready 3.0), the call ends at 3.5. Blocks: 2.0 - 1.5 = 0.5 and
    # 3.0 - 2.75 = 0.25 s; the root's hooks alone would give block 1 nothing and block 2 1.5 s, read
    # wait included.
    units = tuple(Unit(i, n, (r,), (), 0) for i, (n, r) in enumerate(
        (("emb", "emb"), ("fc[0:64]", "fc"), ("fc[64:96]", "fc"), ("head", "head"))))
    prog = Program(units, (0, 1, 2, 3), ())
    root_units = {"emb": [0], "fc": [1, 2], "head": [3]}
    rec = [(p, T0 + a, T0 + b) for p, a, b in (("emb", 0, S // 4), ("fc", S, S), ("head", 3 * S, 3 * S))]
    waits = [(u, T0 + a, T0 + b) for u, a, b in ((1, 5 * S // 4, 3 * S // 2), (2, 2 * S, 11 * S // 4))]
    costs = costs_from_record(prog, root_units, rec, T0, T0 + 7 * S // 2, 5e8, waits)
    assert costs.compute_s == (1.0, 0.5, 0.25, 0.5) and costs.pre_s == 0.0
    assert costs_from_record(prog, root_units, rec, T0, T0 + 7 * S // 2, 5e8).compute_s == (0.75, 0.0, 2.0, 0.5)


def test_costs_from_record_of_another_order_is_none():
    prog, root_units = _recorded_program()
    rec = [(p, T0 + a, T0 + b) for p, a, b in RECORD]
    swapped = [rec[0], rec[1], rec[4], rec[2], rec[3]]  # head before the block
    assert costs_from_record(prog, root_units, swapped, T0, T0 + 5 * S, 5e8) is None
    missing = rec[:4]  # the call never reached head
    assert costs_from_record(prog, root_units, missing, T0, T0 + 5 * S, 5e8) is None
    twice = rec + [rec[1]]  # emb again at the end: a step the program does not have
    assert costs_from_record(prog, root_units, twice, T0, T0 + 5 * S, 5e8) is None
    # and the right order still gives a model, so the Nones above come from the order alone
    assert costs_from_record(prog, root_units, rec, T0, T0 + 5 * S, 5e8) is not None


def test_least_compute_keeps_each_steps_least_and_the_rest_of_the_first():
    serial = CostModel((1.0, 2.0, 3.0), 0.5, 1e9, read_slowdown=0.3, refills=(1, 2, 1))
    warm = CostModel((1.5, 1.25, 3.0), 0.25, 4e9, disk_slowdown=2.0)
    assert least_compute(serial, warm) == CostModel((1.0, 1.25, 3.0), 0.25, 1e9, read_slowdown=0.3, refills=(1, 2, 1))
    with pytest.raises(ValueError, match="2 steps against 3"):
        least_compute(CostModel((1.0, 2.0), 0.0, 1e9), warm)
