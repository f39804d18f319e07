"""The simulator's goldens, worked out by hand: warm latency, stalls and peak bytes of small plans.

Times are sums of binary fractions (0.25, 0.5, 1.5, ...), so the simulator's arithmetic is exact and
the expected numbers are compared exactly.
"""
from __future__ import annotations

from dataclasses import replace

from test_planner import P, program

from layerstream.plan.cost import CostModel, with_read_bytes
from layerstream.plan.simulate import simulate, timeline
from layerstream.plan import Plan, plan_fill


# ---- simulate: goldens -----------------------------------------------------------------------------

def test_everything_resident_is_pure_compute():
    # Unit 1 runs twice. Nothing streams: latency = pre + sum(compute) = 0.0625 + 0.125 + 0.25 + 0.5
    # + 0.25 = 1.1875, no stall, and the arena holds exactly the 1 + 2 + 3 = 6 resident pages.
    prog = program((0, 1, 2, 1), 3)
    sizes = {0: P, 1: 2 * P, 2: 3 * P}
    costs = CostModel((0.125, 0.25, 0.5, 0.25), 0.0625, read_bps=1e6)
    plan = plan_fill(prog, sizes, 6 * P)
    assert plan.loads == () and plan.ring_bytes == 0 and plan.resident_ids == {0, 1, 2}
    for calls in (1, 3):  # no reads: a cold call is a warm one
        pred = simulate(prog, sizes, costs, plan, calls=calls)
        assert pred.latency_s == 1.1875 == costs.compute_total_s
        assert pred.stall_s == 0 and pred.stalls_s == (0, 0, 0, 0)
        assert pred.peak_bytes == 6 * P


def test_one_streamed_unit_reads_during_the_previous_calls_tail():
    # Steps: r0 (resident, 0.5 s), s (streamed, 10 pages, 1.0 s), r2 (resident, 0.5 s); pre 0.25 s.
    # Reading s takes 0.5 s latency + 10 pages / (10 pages/s) = 1.5 s; the ring holds exactly s.
    #   cold call 1 (t=0): s issued at 0, done 1.5; pre + r0 end at 0.75 -> stall 0.75;
    #       s computes 1.5 -> 2.5 and is released (its bytes are free), r2 runs 2.5 -> 3.0.
    #   call 2 (3.0): s was issued at 2.5, during call 1's tail (r2), done 4.0; pre + r0 end at
    #       3.75 -> stall 0.25; s 4.0 -> 5.0 released; r2 -> 5.5. Latency 2.5.
    #   call 3 (5.5): issued 5.0, done 6.5; needed at 6.25 -> stall 0.25; ends 8.0. Latency 2.5.
    # Warm: 1.25 s of compute (r2 + pre + r0) hides 1.25 of the 1.5 s read. Had the next load waited
    # for the call to start, the stall would be 0.75 and the latency 3.0, as in the cold call.
    prog = program((0, 1, 2), 3)
    sizes = {0: P, 1: 10 * P, 2: P}
    costs = CostModel((0.5, 1.0, 0.5), 0.25, read_bps=10 * P, read_lat_s=0.5)
    plan = Plan(12 * P, ((0, 0), (2, P)), 2 * P, 10 * P, ((1, 0),))
    plan.validate(sizes)
    warm = simulate(prog, sizes, costs, plan)  # calls=3: the third call is reported
    assert warm.latency_s == 2.5
    assert warm.stall_s == 0.25 and warm.stalls_s == (0, 0.25, 0)
    assert warm.peak_bytes == 12 * P  # two resident pages + the one 10-page load
    cold = simulate(prog, sizes, costs, plan, calls=1)
    assert (cold.latency_s, cold.stall_s, cold.stalls_s) == (3.0, 0.75, (0, 0.75, 0))
    assert simulate(prog, sizes, costs, plan, calls=2).latency_s == 2.5


def test_loads_sharing_ring_bytes_wait_for_the_release():
    # Two streamed 10-page units a, b in a 10-page ring (the minimum budget): both sit at offset 0.
    # Each read takes 0.5 + 1.0 = 1.5 s, each compute 1.0 s, no pre.
    #   call 1: a read 0 -> 1.5, computes -> 2.5, released; only then b issues: 2.5 -> 4.0, stall 1.5,
    #       computes -> 5.0. Next call's a issues when b is released at 5.0, and so on:
    #   every warm call: stall 1.5 + compute 1.0 per unit = 5.0 s, stall 3.0.
    prog = program((0, 1), 2)
    sizes = {0: 10 * P, 1: 10 * P}
    costs = CostModel((1.0, 1.0), 0.0, read_bps=10 * P, read_lat_s=0.5)
    plan = plan_fill(prog, sizes, 10 * P)
    assert plan.ring_bytes == 10 * P and plan.loads == ((0, 0), (1, 0))
    pred = simulate(prog, sizes, costs, plan)
    assert pred.latency_s == 5.0
    assert pred.stall_s == 3.0 and pred.stalls_s == (1.5, 1.5)
    assert pred.peak_bytes == 10 * P  # never both at once
    # With a 20-page ring b reads while a computes: the disk is the bottleneck, 2 x 1.5 = 3.0 s per
    # warm call (each step waits 0.5: its read started when the previous read ended, 1.5 s before it
    # is done, and only 1.0 s of compute ran since). Both are live at once: peak 20 pages.
    wide = Plan(20 * P, (), 0, 20 * P, ((0, 0), (1, 10 * P)))
    pred = simulate(prog, sizes, costs, wide)
    assert pred.latency_s == 3.0 and pred.stalls_s == (0.5, 0.5)
    assert pred.peak_bytes == 20 * P


def test_reads_hidden_behind_compute_cost_nothing_when_warm():
    # Two 1-page units in a 2-page ring; a read takes 1 page / (4 pages/s) = 0.25 s, compute 1.0 s each.
    #   cold call: a read 0 -> 0.25 (stall 0.25), b read 0.25 -> 0.5 while a computes. Latency 2.25.
    #   warm: a's next read issues when a is released (during b's 1.0 s), b's when b is released, and
    #       0.25 s of it hides behind the next call's a. Stall exactly 0, latency == compute == 2.0.
    prog = program((0, 1), 2)
    sizes = {0: P, 1: P}
    costs = CostModel((1.0, 1.0), 0.0, read_bps=4 * P, read_lat_s=0.0)
    plan = Plan(2 * P, (), 0, 2 * P, ((0, 0), (1, P)))
    warm = simulate(prog, sizes, costs, plan)
    assert warm.stall_s == 0.0 and warm.stalls_s == (0.0, 0.0)
    assert warm.latency_s == 2.0 == costs.compute_total_s
    cold = simulate(prog, sizes, costs, plan, calls=1)
    assert cold.latency_s == 2.25 and cold.stalls_s == (0.25, 0.0)


# ---- loads that read less than their slot (int8 and gather units) ------------------------------------

def test_a_load_is_timed_by_the_bytes_it_reads_and_holds_its_slot():
    # test_one_streamed_unit's program, but s's 10-page slot is filled from 4 pages of file (an int8
    # unit): its read is 0.5 s latency + 4 pages / (8 pages/s) = 1.0 s, not 0.5 + 10 / 8 = 1.75 s.
    #   warm: s issues at its own release in the previous call; r2 + pre + r0 = 1.25 s of compute
    #       hides the 1.0 s read: no stall, latency 0.25 + 0.5 + 1.0 + 0.5 = 2.25 (by slot: the 1.75 s
    #       read stalls 0.5 -> 2.75).
    #   cold call: s read 0 -> 1.0, needed at 0.75: stall 0.25, latency 2.5.
    # Memory is still its slot's: two resident pages + the 10-page load.
    prog = program((0, 1, 2), 3)
    sizes = {0: P, 1: 10 * P, 2: P}
    by_slot = CostModel((0.5, 1.0, 0.5), 0.25, read_bps=8 * P, read_lat_s=0.5)
    costs = with_read_bytes(by_slot, sizes, {1: 4 * P})
    assert costs.read_bytes == ((1, 4 * P),)
    assert costs.read_s(costs.unit_read_bytes(1, 10 * P)) == 1.0 and costs.read_s(costs.unit_read_bytes(0, P)) == 0.625
    plan = Plan(12 * P, ((0, 0), (2, P)), 2 * P, 10 * P, ((1, 0),))
    warm = simulate(prog, sizes, costs, plan)
    assert (warm.latency_s, warm.stall_s, warm.stalls_s, warm.peak_bytes) == (2.25, 0.0, (0, 0, 0), 12 * P)
    cold = simulate(prog, sizes, costs, plan, calls=1)
    assert (cold.latency_s, cold.stalls_s) == (2.5, (0, 0.25, 0))
    assert simulate(prog, sizes, by_slot, plan).latency_s == 2.75
    # what each load holds: the three calls' and the fourth call's, issued in the third's tail
    assert timeline(prog, sizes, costs, plan).load_bytes == (10 * P,) * 4


def test_compute_slows_only_while_the_disk_reads():
    # test_a_load_is_timed_by_the_bytes_it_reads...'s plan (s reads 4 pages of its 10-page slot: 1.0 s),
    # no pre, compute 0.5 + 1.0 + 0.5, and compute twice as slow while the disk reads (slowdown 1).
    #   cold call: s reads 0 -> 1.0 beside r0 (0.5 s of work takes 1.0); s computes alone 1.0 -> 2.0;
    #       then s's next load is issued (its slot is free, it is one call ahead) and reads 2.0 -> 3.0
    #       beside r2, which takes 1.0: 3.0 s.
    #   warm: r0 and s compute alone (0.5 + 1.0), r2 beside the next read (1.0): 2.5 s, stall-free.
    # Slowdown 3 (four times as slow): r2 does 0.25 s of work in the read's 1.0 s, then 0.25 s alone:
    # 1.25, so a warm call is 0.5 + 1.0 + 1.25 = 2.75. Charged by the slot (1.75 s read) it is slower.
    prog = program((0, 1, 2), 3)
    sizes = {0: P, 1: 10 * P, 2: P}
    by_slot = CostModel((0.5, 1.0, 0.5), 0.0, read_bps=8 * P, read_lat_s=0.5, read_slowdown=1.0)
    costs = with_read_bytes(by_slot, sizes, {1: 4 * P})
    plan = Plan(12 * P, ((0, 0), (2, P)), 2 * P, 10 * P, ((1, 0),))
    cold = simulate(prog, sizes, costs, plan, calls=1)
    assert (cold.latency_s, cold.stalls_s) == (3.0, (0, 0, 0))
    assert timeline(prog, sizes, costs, plan, calls=1).compute_s == 3.0  # every second computes
    warm = simulate(prog, sizes, costs, plan)
    assert (warm.latency_s, warm.stalls_s) == (2.5, (0, 0, 0))
    assert timeline(prog, sizes, costs, plan).compute_s == 2.5
    assert simulate(prog, sizes, replace(costs, read_slowdown=3.0), plan).latency_s == 2.75
    assert simulate(prog, sizes, by_slot, plan).latency_s > 2.5


def test_the_disk_slows_only_while_compute_runs():
    # test_compute_slows_only_while_the_disk_reads's plan, compute not slowed but the disk twice as slow
    # while compute runs (disk_slowdown 1). Warm: s's next read (1.0 s alone) is issued when s is
    # released and runs beside r2 (0.5 s: half of the read done, 0.25 s of it), then beside r0 (0.5 s:
    # 0.25 more), then the disk reads the last 0.5 s alone while s waits for it: a 0.5 s stall, and
    # a call of 0.5 + 0.5 + 0.5 (stall) + 1.0 = 2.5 s, against 2.0 with the disk never slowed.
    prog = program((0, 1, 2), 3)
    sizes = {0: P, 1: 10 * P, 2: P}
    costs = with_read_bytes(CostModel((0.5, 1.0, 0.5), 0.0, read_bps=8 * P, read_lat_s=0.5, disk_slowdown=1.0),
                            sizes, {1: 4 * P})
    plan = Plan(12 * P, ((0, 0), (2, P)), 2 * P, 10 * P, ((1, 0),))
    warm = simulate(prog, sizes, costs, plan)
    assert (warm.latency_s, warm.stalls_s) == (2.5, (0, 0.5, 0))
    assert simulate(prog, sizes, replace(costs, disk_slowdown=0.0), plan).latency_s == 2.0
    # The disk at full speed, but only 2 pages (0.25 s) in flight per compute (kernel AIO, refilled
    # between steps): 0.25 s of the read beside r2, 0.25 beside r0, the last 0.5 s while s waits: 2.5 s.
    capped = simulate(prog, sizes, replace(costs, disk_slowdown=0.0, inflight_bytes=2 * P), plan)
    assert (capped.latency_s, capped.stalls_s) == (2.5, (0, 0.5, 0))


def test_kernel_aio_is_topped_up_per_root_and_per_release():
    # The disk reads 1 page a second and 1 page may be in flight per top-up of the queue. Steps u0 (1
    # page, 3.0 s) and u1 (3 pages, 2.0 s) both stream through a 4-page ring. Warm: u1's load (3.0 s)
    # is issued as the call starts and read beside u0. u0 streams, so its release tops the queue up
    # once more than its one root did: 2 s of u1 beside u0, 1 s while u1 waits, and u0's next load
    # (1 s) beside u1: 3 + 1 + 2 = 6.0 s. With two roots in u0 (three top-ups) u1 is all read beside
    # it: 5.0 s, as with nothing capped. (Once per step, as the simulator had it, said 7.0.)
    prog = program((0, 1), 2)
    sizes = {0: P, 1: 3 * P}
    plan = Plan(4 * P, (), 0, 4 * P, ((0, 0), (1, P)))
    costs = CostModel((3.0, 2.0), 0.0, read_bps=P, read_lat_s=0.0, inflight_bytes=P)
    assert simulate(prog, sizes, costs, plan).stalls_s == (0.0, 1.0)
    assert simulate(prog, sizes, replace(costs, refills=(1, 1)), plan).latency_s == 6.0
    assert simulate(prog, sizes, replace(costs, refills=(2, 1)), plan).latency_s == 5.0
    assert simulate(prog, sizes, replace(costs, inflight_bytes=0), plan).latency_s == 5.0


def test_reads_beside_a_stall_cost_no_compute():
    # test_cpsat_bound_is_tight's two units through one 10-page slot: each read (1.5 s) waits for the
    # other unit's release, so the disk only ever reads while compute waits: read, compute, read,
    # compute is 5.0 s at any slowdown.
    prog = program((0, 1), 2)
    sizes = {0: 10 * P, 1: 10 * P}
    costs = CostModel((1.0, 1.0), 0.0, read_bps=10 * P, read_lat_s=0.5)
    plan = plan_fill(prog, sizes, 10 * P)
    for x in (0.0, 1.0, 4.0):  # and the disk, which only ever reads while compute waits, as slow as you like
        warm = simulate(prog, sizes, replace(costs, read_slowdown=x, disk_slowdown=x), plan)
        assert (warm.latency_s, warm.stalls_s) == (5.0, (1.5, 1.5))


def test_read_bytes_equal_to_the_slots_predict_as_before():
    # Listed or not, a unit that reads its slot is charged the same: every prediction is unchanged.
    prog = program((0, 1), 2)
    sizes = {0: 10 * P, 1: 10 * P}
    costs = CostModel((1.0, 1.0), 0.0, read_bps=10 * P, read_lat_s=0.5, read_slowdown=0.5)
    assert with_read_bytes(costs, sizes, sizes) == costs  # entries equal to the slot are dropped
    listed = replace(costs, read_bytes=((0, 10 * P), (1, 10 * P)))
    for plan in (plan_fill(prog, sizes, 10 * P), Plan(20 * P, (), 0, 20 * P, ((0, 0), (1, 10 * P)))):
        assert simulate(prog, sizes, listed, plan) == simulate(prog, sizes, costs, plan)
