"""Where each unit's bytes are in the file, and how to read them with aligned reads (pure).

O_DIRECT needs the file offset, the length and the buffer aligned, so a unit is read as aligned
supersets of its tensors. Neighbouring tensors are coalesced into one read when the gap between them is
small: one larger read costs less than two syscalls, and the gap's bytes are the only memory it wastes.
"""
from __future__ import annotations

from .format import FileIndex
from .quant import expand_layout, quant_table
from .units import Extent, Unit, UnitLayout, parse_block

ALIGN = 4096  # page size: satisfies O_DIRECT on every Linux filesystem we target
MAX_GAP = 64 * 1024  # coalesce tensors whose gap is below this; bounds the wasted slot bytes
GATHER_SLOT = 2 * 2**20  # a gather unit's slot: the rows of a 128-token prompt of a 2048-wide fp32 table
GATHER_ROWS = 64  # ... and at least this many rows of a wider table


def align_down(x: int) -> int:
    return x - x % ALIGN


def align_up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def tensor_span(index: FileIndex, name: str) -> tuple[int, int]:
    """[begin, end) file offsets of tensor `name`, or of the rows a block_name names."""
    t = index.tensors.get(name)
    if t is not None:
        return t.begin, t.end
    base, lo, hi = parse_block(name) or (name, 0, 0)
    t = index.tensors[base]  # KeyError for a name that is neither
    row = t.nbytes // t.shape[0]
    return t.begin + lo * row, t.begin + hi * row


def gather_layout(unit: Unit, index: FileIndex) -> UnitLayout:
    """A gather unit reads nothing ahead: its slot is scratch for the rows one lookup reads (lookup.py)."""
    t = index.tensors[unit.tensors[0]]
    row = t.nbytes // t.shape[0]
    slot = min(align_up(t.nbytes) + ALIGN, max(GATHER_SLOT, GATHER_ROWS * (align_up(row) + ALIGN)))
    return UnitLayout(unit.uid, (), (), slot, t.end, (t.begin, row))


def unit_layout(unit: Unit, index: FileIndex) -> UnitLayout:
    """Aligned extents covering the unit's tensors, and each tensor's offset in the unit's slot.

    A unit with int8 tensors also reads their scales, and its slot expands them (quant.expand_layout).
    """
    if unit.mode == "gather":
        return gather_layout(unit, index)
    quant = quant_table(index)
    scales = [quant[n].scale for n in unit.tensors if n in quant]
    spans = sorted((*tensor_span(index, n), n) for n in (*unit.tensors, *scales))
    groups: list[list[tuple[int, int, str]]] = []
    for s in spans:
        if groups and align_down(s[0]) <= align_up(groups[-1][-1][1]) + MAX_GAP:
            groups[-1].append(s)
        else:
            groups.append([s])
    extents, offsets, slot = [], [], 0
    for g in groups:
        start, end = align_down(g[0][0]), align_up(max(e for _, e, _ in g))
        extents.append(Extent(start, end - start, slot))
        offsets.extend((n, slot + b - start) for b, _, n in g)
        slot += end - start
    data_end = max((e for _, e, _ in spans), default=0)
    if scales:
        return expand_layout(unit.uid, extents, dict(offsets), list(unit.tensors), index, quant, data_end)
    return UnitLayout(unit.uid, tuple(extents), tuple(offsets), slot, data_end)
