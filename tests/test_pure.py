"""The pure core (layout, planning, unit merging) on hand-made inputs, against values worked out by hand."""
from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from torch import nn

import layerstream as ls
from layerstream.capture import capture, fuse
from layerstream.format import FileIndex, FileTensor, read_index
from layerstream.layout import ALIGN, MAX_GAP, unit_layout
from layerstream.plan import Plan, min_budget, place_ring, plan_fill
from layerstream.units import Extent, Program, Unit

P = 4096  # one page: hand-made slot sizes are whole pages, as unit_layout makes them


def index_of(*tensors: tuple[str, str, tuple[int, ...], int, int], file_size: int = 2**21) -> FileIndex:
    """A FileIndex by hand from (name, dtype, shape, begin, end), offsets absolute."""
    return FileIndex("hand.safetensors", file_size, 128,
                     {n: FileTensor(n, d, s, b, e) for n, d, s, b, e in tensors}, {})


def unit(uid: int, tensors: tuple[str, ...] = (), name: str | None = None, pinned: bool = False,
         nbytes: int = 0) -> Unit:
    name = name or f"u{uid}"
    return Unit(uid, name, (name,), tensors, nbytes, pinned)


# ---- unit_layout -----------------------------------------------------------------------------------

HAND = index_of(
    ("a", "F32", (250,), 128, 1128),
    ("b", "F32", (1250,), 1128, 6128),
    ("other", "F32", (25000,), 6128, 106128),  # not in the unit: its bytes must not be read
    ("c", "F32", (2048,), 200000, 208192),
    ("d", "F16", (1500,), 218192, 221192),  # aligned gap to c: 217088 - 208896 = 8 KiB < MAX_GAP
    ("e", "U8", (400,), 1000000, 1000400),  # far away: a read of its own
)


def test_layout_exact_extents_and_offsets():
    lay = unit_layout(unit(7, ("c", "a", "e", "b", "d")), HAND)
    assert lay.uid == 7
    assert lay.extents == (
        Extent(file_off=0, nbytes=8192, slot_off=0),  # a, b: [128, 6128) -> pages [0, 8192)
        Extent(file_off=196608, nbytes=28672, slot_off=8192),  # c, d: [200000, 221192) -> [196608, 225280)
        Extent(file_off=999424, nbytes=4096, slot_off=36864),  # e: [1000000, 1000400) -> [999424, 1003520)
    )
    assert dict(lay.tensor_offsets) == {"a": 128, "b": 1128, "c": 8192 + 3392, "d": 8192 + 21584,
                                        "e": 36864 + 576}
    assert len(lay.tensor_offsets) == 5
    assert lay.slot_nbytes == 40960
    assert lay.data_end == 1000400


@pytest.mark.parametrize("gap, extents", [
    (MAX_GAP - ALIGN, (Extent(0, 69632, 0),)),  # below MAX_GAP: one read, the gap's bytes included
    (MAX_GAP + ALIGN, (Extent(0, 4096, 0), Extent(73728, 4096, 4096))),  # above: two reads
])
def test_layout_coalesces_only_small_gaps(gap, extents):
    idx = index_of(("x", "U8", (4096,), 0, 4096), ("y", "U8", (100,), 4096 + gap, 4196 + gap))
    lay = unit_layout(unit(0, ("y", "x")), idx)
    assert lay.extents == extents
    assert dict(lay.tensor_offsets) == {"x": 0, "y": extents[-1].slot_off + (4096 + gap) - extents[-1].file_off}
    assert lay.slot_nbytes == sum(e.nbytes for e in extents)
    assert lay.data_end == 4196 + gap


def test_layout_aligned_tensor_and_empty_unit():
    idx = index_of(("w", "F32", (2048,), 8192, 16384))
    lay = unit_layout(unit(0, ("w",)), idx)
    assert lay.extents == (Extent(8192, 8192, 0),) and lay.tensor_offsets == (("w", 0),)
    assert lay.slot_nbytes == 8192
    empty = unit_layout(unit(1), idx)
    assert (empty.extents, empty.tensor_offsets, empty.slot_nbytes, empty.data_end) == ((), (), 0, 0)


def test_layout_invariants_random():
    rng = random.Random(3)
    for _ in range(200):
        pos, tensors = 128, []
        for i in range(rng.randrange(1, 12)):
            pos += rng.choice([0, 0, 7, 4000, 30000, 70000, 200000])
            n = rng.choice([0, 1, 64, 4096, 5000, 70000])
            tensors.append((f"t{i}", "U8", (n,), pos, pos + n))
            pos += n
        idx = index_of(*tensors, file_size=pos)
        names = tuple(rng.sample([t[0] for t in tensors], rng.randrange(1, len(tensors) + 1)))
        lay = unit_layout(unit(0, names), idx)
        slot = 0
        for ex in lay.extents:
            assert ex.file_off % ALIGN == 0 and ex.nbytes % ALIGN == 0 and ex.nbytes > 0
            assert ex.slot_off == slot
            slot += ex.nbytes
        assert lay.slot_nbytes == slot
        for a, b in zip(lay.extents, lay.extents[1:]):
            assert b.file_off - (a.file_off + a.nbytes) > MAX_GAP  # else they would be one read
        offs = dict(lay.tensor_offsets)
        assert sorted(offs) == sorted(names)
        for n in names:  # each tensor's bytes lie inside one extent, at the slot offset given
            t = idx.tensors[n]
            ex = next(x for x in lay.extents if x.file_off <= t.begin and t.end <= x.file_off + x.nbytes)
            assert offs[n] == ex.slot_off + t.begin - ex.file_off
        assert lay.data_end == max(idx.tensors[n].end for n in names)


# ---- place_ring ------------------------------------------------------------------------------------

@pytest.mark.parametrize("sizes, ring, offsets", [
    ([3, 4, 2, 5], 8, [0, 3, 0, 2]),  # the 2 does not fit [7, 8): wraps to 0
    ([5, 3, 5, 3], 8, [0, 5, 0, 5]),  # exact fits at the end do not wrap
    ([8, 8, 1], 8, [0, 0, 0]),
    ([1, 1, 1, 1, 1], 3, [0, 1, 2, 0, 1]),
    ([], 0, []),
    ([2 * P, P, 3 * P, 2 * P], 5 * P, [0, 2 * P, 0, 3 * P]),
])
def test_place_ring_exact(sizes, ring, offsets):
    assert place_ring(sizes, ring) == offsets


def test_place_ring_load_larger_than_ring():
    with pytest.raises(ls.BudgetError, match="does not fit"):
        place_ring([2, 9, 1], 8)


# ---- plan_fill and min_budget ----------------------------------------------------------------------

# <top> owns a pinned parameter; emb 4 pages; four 2-page layers; a 3-page head. 16 pages in all.
PROG = Program(
    (unit(0, ("top.p",), "<top>", pinned=True), unit(1, ("emb",), "emb"),
     *(unit(2 + i, (f"l{i}",), f"l{i}") for i in range(4)), unit(6, ("head",), "head")),
    (0, 1, 2, 3, 4, 5, 6), ())
SIZES = {0: P, 1: 4 * P, 2: 2 * P, 3: 2 * P, 4: 2 * P, 5: 2 * P, 6: 3 * P}

# `block` (units 2, 3) runs twice, as in zoo's `twice`: steps repeat units.
TWICE = Program((unit(0, ("scale",), "<top>", pinned=True), unit(1, ("inp",), "inp"),
                 unit(2, ("b0",), "block.0"), unit(3, ("b2",), "block.2"), unit(4, ("out",), "out")),
                (0, 1, 2, 3, 2, 3, 4), ())
TWICE_SIZES = {0: P, 1: 5 * P, 2: 5 * P, 3: P, 4: 5 * P}


def test_min_budget():
    assert min_budget(PROG, SIZES) == (5 * P, 1)  # pinned <top> + emb, the largest streamed unit
    assert min_budget(TWICE, TWICE_SIZES) == (6 * P, 1)  # ties go to the first unit
    pinned_only = Program((unit(0, pinned=True), unit(1, pinned=True)), (0, 1), ())
    assert min_budget(pinned_only, {0: P, 1: 2 * P}) == (3 * P, None)
    off_steps = Program((unit(0, pinned=True), unit(1), unit(2)), (1, 2), ())  # a pinned unit not in steps
    assert min_budget(off_steps, {0: 3 * P, 1: P, 2: 2 * P}) == (5 * P, 2)


@pytest.mark.parametrize("budget, resident, ring, loads", [
    (5 * P, [(0, 0)], 4 * P,  # the minimum: everything but <top> streams through a 4-page ring
     [(1, 0), (2, 0), (3, 2 * P), (4, 0), (5, 2 * P), (6, 0)]),
    (10 * P, [(0, 0)], 9 * P,  # emb resident would leave 5 pages, short of the 9-page ring target
     [(1, 0), (2, 4 * P), (3, 6 * P), (4, 0), (5, 2 * P), (6, 4 * P)]),
    (10 * P + 100, [(0, 0)], 9 * P,  # the ring is whole pages: the 100 bytes stay unused
     [(1, 0), (2, 4 * P), (3, 6 * P), (4, 0), (5, 2 * P), (6, 4 * P)]),
    (14 * P, [(0, 0), (1, P), (6, 5 * P)], 6 * P,  # largest first, while 3 layers still fit the ring
     [(2, 0), (3, 2 * P), (4, 4 * P), (5, 0)]),
    (16 * P, [(0, 0), (1, P), (6, 5 * P), (2, 8 * P), (3, 10 * P), (4, 12 * P), (5, 14 * P)], 0, []),
])
def test_plan_fill_exact(budget, resident, ring, loads):
    plan = plan_fill(PROG, SIZES, budget)
    assert plan.budget_bytes == budget
    assert plan.resident == tuple(resident)
    assert plan.ring_offset == sum(SIZES[u] for u, _ in resident)
    assert plan.ring_bytes == ring
    assert plan.loads == tuple(loads)
    assert plan.arena_bytes == plan.ring_offset + ring <= budget


@pytest.mark.parametrize("program, sizes", [(PROG, SIZES), (TWICE, TWICE_SIZES)])
@pytest.mark.parametrize("extra", [0, 1, P, 10**9])
def test_budget_holding_everything_streams_nothing(program, sizes, extra):
    total = sum(sizes.values())
    plan = plan_fill(program, sizes, total + extra)
    assert plan.loads == () and plan.ring_bytes == 0
    assert plan.resident_ids == frozenset(sizes)
    assert plan.arena_bytes == total


def test_pinned_unit_outside_steps_is_resident():
    prog = Program((unit(0, pinned=True), unit(1), unit(2)), (1, 2), ())
    plan = plan_fill(prog, {0: 3 * P, 1: P, 2: 2 * P}, 5 * P)
    assert plan.resident == ((0, 0),)
    assert plan.ring_offset == 3 * P and plan.ring_bytes == 2 * P
    assert plan.loads == ((1, 0), (2, 0))


def test_below_minimum_names_it():
    with pytest.raises(ls.BudgetError) as e:
        plan_fill(PROG, SIZES, 5 * P - 1)
    assert e.value.minimum_bytes == 5 * P
    assert f"{5 * P} bytes" in str(e.value) and "unit 1 (emb," in str(e.value)
    pinned_only = Program((unit(0, pinned=True), unit(1, pinned=True)), (0, 1), ())
    with pytest.raises(ls.BudgetError, match="pinned units must be resident") as e:
        plan_fill(pinned_only, {0: P, 1: 2 * P}, 3 * P - 1)
    assert e.value.minimum_bytes == 3 * P


def _random_program(rng: random.Random) -> tuple[Program, dict[int, int]]:
    n = rng.randrange(1, 13)
    units = tuple(unit(i, (f"t{i}",), pinned=rng.random() < 0.15) for i in range(n))
    sizes = {i: P * rng.randrange(1, 9) for i in range(n)}
    steps = [i for i in range(n) if rng.random() < 0.9]
    rng.shuffle(steps)
    for _ in range(rng.randrange(4)):  # modules called more than once
        if steps:
            steps.insert(rng.randrange(len(steps) + 1), rng.choice(steps))
    return Program(units, tuple(steps), ()), sizes


def test_plan_fill_random_programs_respect_the_budget():
    rng = random.Random(11)
    planned = 0
    for _ in range(60):
        prog, sizes = _random_program(rng)
        need, _ = min_budget(prog, sizes)
        pinned = {u.uid for u in prog.units if u.pinned}
        used = set(prog.steps) | pinned
        total = sum(sizes[u] for u in used)
        budgets = {need - 1, need, total, total + 1} | {rng.randrange(need, total + 3 * P) for _ in range(12)}
        for budget in sorted(b for b in budgets if b >= 0):
            if budget < need:
                with pytest.raises(ls.BudgetError) as e:
                    plan_fill(prog, sizes, budget)
                assert e.value.minimum_bytes == need
                continue
            plan = plan_fill(prog, sizes, budget)
            planned += 1
            assert plan.arena_bytes <= budget
            assert plan.ring_bytes % P == 0
            res = [u for u, _ in plan.resident]
            assert len(set(res)) == len(res) and pinned <= set(res) and set(res) <= used
            off = 0
            for u, o in plan.resident:  # packed one after another
                assert o == off
                off += sizes[u]
            assert plan.ring_offset == off
            assert [u for u, _ in plan.loads] == [s for s in prog.steps if s not in set(res)]
            for u, o in plan.loads:
                assert 0 <= o and o + sizes[u] <= plan.ring_bytes
            if budget >= total:
                assert plan.loads == ()
            assert Plan.from_json(plan.to_json()) == plan
    assert planned > 300


def test_plan_json_round_trip():
    plan = plan_fill(PROG, SIZES, 10 * P)
    text = plan.to_json()
    assert Plan.from_json(text) == plan
    hand = Plan(123456, ((3, 0), (1, 8192)), 12288, 40960, ((0, 0), (2, 4096), (0, 0)), planner="greedy")
    back = Plan.from_json(hand.to_json())
    assert back == hand and back.planner == "greedy" and back.loads[1] == (2, 4096)
    assert back.arena_bytes == 12288 + 40960 and back.resident_ids == frozenset({1, 3})


# ---- capture and fuse ------------------------------------------------------------------------------

D = 16


class Block(nn.Module):
    """Like a ResNet block: `shortcut` is registered first and runs last; `gamma` is owned beside the
    children, so it becomes a pinned unit."""

    def __init__(self):
        super().__init__()
        self.shortcut = nn.Linear(D, D)
        self.conv1 = nn.Linear(D, D)
        self.conv2 = nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.ones(D))

    def forward(self, x):
        return self.conv2(self.conv1(x)) * self.gamma + self.shortcut(x)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(D, D)
        self.block = Block()
        self.shared = nn.Linear(D, D)  # called twice per forward
        self.head = nn.Linear(D, 256)  # 17 KiB: the largest unit, so it sets the merge cap
        self.unused = nn.Linear(D, D)  # never called

    def forward(self, x):
        x = self.shared(self.stem(x))
        x = self.shared(self.block(x))
        return self.head(x)


def _captured(tmp_path):
    from safetensors.torch import save_model
    torch.manual_seed(0)
    path = str(tmp_path / "net.safetensors")
    save_model(Net(), path)
    with ls.init_empty_weights():
        model = Net()
    index = read_index(path)
    cap = capture(model, index, max_unit=2000)  # a Linear(16, 16) is 1088 bytes; the block 3328
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, p=p: order.append(p)) for p, m in cap.roots.items()]
    model(torch.empty(1, D, device="meta"))
    for h in hooks:
        h.remove()
    return cap, order, index


def test_capture_cuts_in_registration_order(tmp_path):
    cap, order, _ = _captured(tmp_path)
    units = cap.program.units
    assert [u.roots for u in units] == [("stem",), ("block",), ("block.shortcut",), ("block.conv1",),
                                        ("block.conv2",), ("shared",), ("head",), ("unused",)]
    assert [u.uid for u in units if u.pinned] == [1] and units[1].tensors == ("block.gamma",)
    assert units[2].tensors == ("block.shortcut.weight", "block.shortcut.bias")
    assert units[6].nbytes == 256 * D * 4 + 256 * 4
    assert cap.program.steps == tuple(range(8))  # the first guess: registration order
    assert order == ["stem", "shared", "block", "block.conv1", "block.conv2", "block.shortcut", "shared", "head"]


def test_fuse_merges_in_execution_order(tmp_path):
    cap, order, index = _captured(tmp_path)
    fused = fuse(cap, order, 2**20, index)
    prog = fused.program
    assert [prog.units[s].roots for s in prog.steps] == [
        ("stem",), ("shared",), ("block",),
        ("block.conv1", "block.conv2", "block.shortcut"),  # the closer is the root that really runs last
        ("shared",), ("head",)]
    assert prog.steps[1] == prog.steps[4]  # `shared` is loaded twice and merged with nothing
    assert prog.units[prog.steps[2]].pinned  # the pinned unit stays alone
    merged = prog.units[prog.steps[3]]
    assert merged.name == "block.conv1+block.conv2+block.shortcut"
    assert merged.nbytes == 3 * (D * D * 4 + D * 4)
    assert [u.roots for u in prog.units if u.uid not in prog.steps] == [("unused",)]  # kept for later calls
    # Every tensor is in exactly one unit, and no merged slot outgrows the largest unit.
    assert sorted(t for u in prog.units for t in u.tensors) == sorted(t for u in cap.base.units for t in u.tensors)
    slot = {u.uid: unit_layout(u, index).slot_nbytes for u in prog.units}
    base_slot = max(unit_layout(u, index).slot_nbytes for u in cap.base.units)
    assert max(slot.values()) <= base_slot
    assert fused.base == cap.base and fused.root_units["shared"] == [prog.steps[1]]


def test_fuse_with_no_merge_room_keeps_units_apart(tmp_path):
    cap, order, index = _captured(tmp_path)
    prog = fuse(cap, order, 0, index).program
    assert all(len(u.roots) == 1 for u in prog.units)
    assert [prog.units[s].roots[0] for s in prog.steps] == order
    assert len(prog.units) == len(cap.base.units)


# ---- the pure modules stay pure --------------------------------------------------------------------

PURE = ["layerstream.units", "layerstream.format", "layerstream.layout", "layerstream.plan", "layerstream.budget"]
CHECK = """
import sys, threading
{setup}
import {modules}
heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "layerstream.runtime"))
               or m in ("layerstream.capture", "layerstream.stream", "layerstream.meta"))
assert not heavy, heavy
assert threading.active_count() == 1, threading.enumerate()
print("pure")
"""
# Load the submodules under a bare `layerstream` package, so only their own imports count.
BARE_PACKAGE = """
import importlib.util, types
pkg = types.ModuleType("layerstream")
pkg.__path__ = list(importlib.util.find_spec("layerstream").submodule_search_locations)
sys.modules["layerstream"] = pkg
"""


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_pure_modules_import_no_torch_nor_runtime():
    r = _run(CHECK.format(setup=BARE_PACKAGE, modules=", ".join(PURE)))
    assert r.returncode == 0 and r.stdout.strip() == "pure", r.stderr
