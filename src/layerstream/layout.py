"""Where each unit's bytes are in the file, and how to read them with aligned reads (pure).

O_DIRECT needs the file offset, the length and the buffer aligned, so a unit is read as aligned
supersets of its tensors. Neighbouring tensors are coalesced into one read when the gap between them is
small: one larger read costs less than two syscalls, and the gap's bytes are the only memory it wastes.
"""
from __future__ import annotations

from .format import FileIndex
from .quant import expand_layout, quant_table
from .units import Extent, Unit, UnitLayout

ALIGN = 4096  # page size: satisfies O_DIRECT on every Linux filesystem we target
MAX_GAP = 64 * 1024  # coalesce tensors whose gap is below this; bounds the wasted slot bytes


def _down(x: int) -> int:
    return x - x % ALIGN


def _up(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


def unit_layout(unit: Unit, index: FileIndex) -> UnitLayout:
    """Aligned extents covering the unit's tensors, and each tensor's offset in the unit's slot.

    A unit with int8 tensors also reads their scales, and its slot expands them (quant.expand_layout).
    """
    quant = quant_table(index)
    scales = [quant[n].scale for n in unit.tensors if n in quant]
    spans = sorted((index.tensors[n].begin, index.tensors[n].end, n) for n in (*unit.tensors, *scales))
    groups: list[list[tuple[int, int, str]]] = []
    for s in spans:
        if groups and _down(s[0]) <= _up(groups[-1][-1][1]) + MAX_GAP:
            groups[-1].append(s)
        else:
            groups.append([s])
    extents, offsets, slot = [], [], 0
    for g in groups:
        start, end = _down(g[0][0]), _up(max(e for _, e, _ in g))
        extents.append(Extent(start, end - start, slot))
        offsets.extend((n, slot + b - start) for b, _, n in g)
        slot += end - start
    data_end = max((e for _, e, _ in spans), default=0)
    if scales:
        return expand_layout(unit.uid, extents, dict(offsets), list(unit.tensors), index, quant, data_end)
    return UnitLayout(unit.uid, tuple(extents), tuple(offsets), slot, data_end)
