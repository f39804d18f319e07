"""The plain data every stage shares: tensors, load units, the step order, read layouts.

No torch, no threads, no I/O: capture produces these, the planner consumes them, the runtime carries
them out. Everything is frozen so a Program or a layout can be cached, printed and compared.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorRef:
    """One tensor of the weight file that the model needs."""

    name: str  # its name in the weight file
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    nbytes: int
    aliases: tuple[str, ...] = ()  # other state_dict names of the same tensor (tied weights)


@dataclass(frozen=True)
class Unit:
    """A set of tensors loaded and released together: the weights of one or more module subtrees.

    A unit is needed from the pre-forward hook of its first root to the forward hook of its last
    root (`roots[-1]`, the *closer*). Roots of a merged unit run one after another, so that window is
    short; a *pinned* unit holds the parameters a module owns beside its children, whose window
    encloses the children's, so it is always resident (a ring slot held that long would block the ring).
    """

    uid: int
    name: str
    roots: tuple[str, ...]  # module paths ("" is the top module) whose forward needs this unit
    tensors: tuple[str, ...]  # file tensor names
    nbytes: int  # sum of the tensors' bytes
    pinned: bool = False
    # "" for an ordinary unit; "gather": an embedding table whose rows are read per call, only those the
    # lookup needs, into a small slot; "block": a row block of an oversized linear layer, computed on its
    # own (see lookup.py). Neither is ever merged with another unit.
    mode: str = ""


BLOCK_SEP = "#rows="


def block_name(name: str, lo: int, hi: int) -> str:
    """The name of rows [lo, hi) of tensor `name`: a virtual tensor a block unit holds."""
    return f"{name}{BLOCK_SEP}{lo}:{hi}"


def parse_block(name: str) -> tuple[str, int, int] | None:
    """(tensor, lo, hi) of a block_name, else None."""
    base, sep, rows = name.rpartition(BLOCK_SEP)
    if not sep:
        return None
    lo, _, hi = rows.partition(":")
    return base, int(lo), int(hi)


def roots_in_order(units) -> list[str]:
    """The root paths of `units` in order; the row blocks of one layer (one call of it) count once."""
    out: list[str] = []
    prev = None
    for u in units:
        if not (u.mode == "block" and prev is not None and prev.mode == "block" and prev.roots == u.roots
                and prev.uid != u.uid):
            out.extend(u.roots)
        prev = u
    return out


@dataclass(frozen=True)
class Program:
    """What one call of the model needs, in order.

    `steps` lists unit ids in the order they are first needed in one call; a unit appears once per
    time it is loaded (a module called twice, apart, appears twice).
    """

    units: tuple[Unit, ...]
    steps: tuple[int, ...]
    tensors: tuple[TensorRef, ...]

    @property
    def root_order(self) -> list[str]:
        """The module paths one call runs, in step order: what `fuse` merges along (a path whose
        consecutive units are its row blocks appears once)."""
        return roots_in_order(self.units[u] for u in self.steps)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all distinct tensors: what preloading the whole model costs."""
        return sum(t.nbytes for t in self.tensors)


@dataclass(frozen=True)
class Extent:
    """One aligned read: `nbytes` from file offset `file_off` into the unit's slot at `slot_off`."""

    file_off: int
    nbytes: int
    slot_off: int


@dataclass(frozen=True)
class Expand:
    """One tensor of a unit with int8 weights, turned from its stored bytes into what the model sees.

    With a `scale` it is int8 dequantised (a float32 scale per output channel, `axis` the channel's
    dimension: 0 for Linear's [out, in], 1 for Conv1D's [in, out]); without one it is a plain move of
    `nbytes` stored bytes (a bias, a norm: stored as the model sees them). See quant.py.
    """

    name: str
    src_off: int  # slot offset of the stored bytes, where the read put them
    dst_off: int  # slot offset of the tensor the model sees
    nbytes: int  # stored bytes
    shape: tuple[int, ...]
    dtype: str  # the dtype the model sees ("F32"), the stored one for a move
    scale: str = ""  # the scale tensor's name; "" for a move
    scale_off: int = 0  # slot offset of the float32 scales, where the read put them
    axis: int = 0


@dataclass(frozen=True)
class UnitLayout:
    """How a unit is read from a particular file and where each tensor sits in its slot.

    Reads are aligned supersets of the tensors (O_DIRECT wants aligned offsets, lengths and buffers),
    so a slot is slightly larger than the unit's bytes; `slot_nbytes` is what the arena must hold.
    A unit holding int8 weights also has an `expand` plan: its stored bytes are read into the slot's
    tail and expanded in place, after the read is verified, to the tensors at `tensor_offsets`.
    """

    uid: int
    extents: tuple[Extent, ...]
    tensor_offsets: tuple[tuple[str, int], ...]  # (tensor name, byte offset in the slot)
    slot_nbytes: int
    data_end: int  # file offset past the last byte any tensor needs (reads past EOF are fine up to it)
    table: tuple[int, int] | None = None  # a gather unit: (file offset of the table, bytes per row)
    expand: tuple[Expand, ...] = ()  # () for a unit read as the model sees it

    @property
    def read_nbytes(self) -> int:
        """Bytes read from the file: the extents (less than the slot when int8 weights are expanded)."""
        return sum(x.nbytes for x in self.extents)
