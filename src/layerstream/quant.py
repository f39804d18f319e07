"""Int8 weights in a packed file: the quant table, and how a unit's slot expands them in place (pure).

`pack --quantize int8` stores the weight of every linear layer (nn.Linear, transformers' Conv1D) that
no other module shares as symmetric int8 with one float32 scale per output channel:
scale = absmax / 127 (1 for an all-zero channel), q = round(w / scale) clamped to [-127, 127], and the
model sees q * scale (quantize.py holds the arithmetic). The int8 tensor keeps its name and shape
(dtype I8); its scales are the F32 tensor `NAME.__scale__`, one per output channel, stored right after
it in the same unit. The unit table lists them, with the dtype the model sees and the channel's axis
(0 for Linear's [out, in], 1 for Conv1D's [in, out]):
    table["quant"] = {NAME: {"scale": "NAME.__scale__", "dtype": "F32", "axis": 0}, ...}
Tied weights (a tied embedding and lm_head) stay float: the embedding reads float rows of them.

The budget counts what the model sees (float), the disk what is stored (a quarter of it): a unit with
int8 weights reads its stored bytes into the tail of a slot laid out for the float tensors, then
expands them in place front to back (`expand_layout`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache

from .format import DTYPE_BYTES, FileIndex, FileTensor, FormatError
from .packfile import META_KEY, TENSOR_ALIGN, UNIT_ALIGN
from .units import Expand, Extent, UnitLayout

SCALE_SUFFIX = ".__scale__"
FLOATS = ("F32", "F16", "BF16", "F64")


class QuantTableCorrupt(FormatError):
    """The packed file's quant table does not agree with its tensors."""


@dataclass(frozen=True)
class QuantTensor:
    """An int8 tensor of a packed file: its scales' tensor, the dtype the model sees, the channel axis."""

    name: str
    scale: str
    dtype: str
    axis: int


def scale_name(name: str) -> str:
    return name + SCALE_SUFFIX


@lru_cache(maxsize=8)
def _parse(text: str) -> object:
    try:
        return json.loads(text).get("quant", {})
    except (ValueError, AttributeError):
        return {}  # packfile.unit_table names what is wrong with the table as a whole


def quant_table(index: FileIndex) -> dict[str, QuantTensor]:
    """The validated int8 tensors of a packed file by name; {} for a file without any."""
    text = index.metadata.get(META_KEY)
    raw = _parse(text) if text is not None else {}
    if not raw:
        return {}

    def bad(why: str) -> QuantTableCorrupt:
        return QuantTableCorrupt(f"{index.path}: the layerstream quant table {why}; the file was changed after "
                                 "packing or is corrupt: pack it again from its source with --quantize int8")

    if not isinstance(raw, dict):
        raise bad(f"is a JSON {type(raw).__name__}, not an object of {{tensor: {{scale, dtype, axis}}}}")
    out = {}
    for name, e in raw.items():
        if not (isinstance(e, dict) and isinstance(e.get("scale"), str) and e.get("dtype") in FLOATS
                and e.get("axis") in (0, 1)):
            raise bad(f"entry {name!r:.80} must be {{scale: str, dtype: one of {', '.join(FLOATS)}, axis: 0 or 1}}, "
                      f"got {e!r:.120}")
        t, s = index.tensors.get(name), index.tensors.get(e["scale"])
        if t is None or s is None:
            raise bad(f"lists {name!r} with scales {e['scale']!r}, which the file does not hold")
        if t.dtype != "I8" or len(t.shape) != 2:
            raise bad(f"lists {name!r}, stored as {t.dtype}{list(t.shape)}: int8 tensors are I8 and 2-D")
        if s.dtype != "F32" or s.shape != (t.shape[e["axis"]],):
            raise bad(f"gives {name!r} ({list(t.shape)}, axis {e['axis']}) the scales {e['scale']!r} "
                      f"{s.dtype}{list(s.shape)}: one F32 scale per output channel ([{t.shape[e['axis']]}])")
        out[name] = QuantTensor(name, e["scale"], e["dtype"], e["axis"])
    return out


def seen_as(t: FileTensor, quant: dict[str, QuantTensor]) -> tuple[str, int]:
    """(dtype, bytes) of a file tensor as the model sees it: an int8 one's float dtype and size."""
    q = quant.get(t.name)
    return (t.dtype, t.nbytes) if q is None else (q.dtype, t.nbytes * DTYPE_BYTES[q.dtype])


def rename_quant(original: FileIndex, renamed: FileIndex) -> FileIndex:
    """`renamed` (the tensors of `original` renamed to a model's, by offset) with its quant table too.

    A quantized tensor the renaming dropped is dropped from the table; a scale it dropped (its name
    fitted no renaming) is kept under its stored name, so every int8 tensor left keeps its scales.
    """
    quant = quant_table(original)
    if renamed is original or not quant:
        return renamed
    by_span = {(t.begin, t.end): n for n, t in renamed.tensors.items()}
    tensors, table = dict(renamed.tensors), {}

    def new(name: str) -> str | None:
        t = original.tensors[name]
        return by_span.get((t.begin, t.end))

    for q in quant.values():
        name = new(q.name)
        if name is None:
            continue
        scale = new(q.scale)
        if scale is None:
            scale = q.scale
            tensors[scale] = original.tensors[scale]
        table[name] = {"scale": scale, "dtype": q.dtype, "axis": q.axis}
    full = json.loads(original.metadata[META_KEY])
    full["quant"] = table
    meta = {**renamed.metadata, META_KEY: json.dumps(full, separators=(",", ":"))}
    return replace(renamed, tensors=tensors, metadata=meta)


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


def expand_layout(uid: int, extents: list[Extent], read_off: dict[str, int], tensors: list[str],
                  index: FileIndex, quant: dict[str, QuantTensor], data_end: int) -> UnitLayout:
    """The slot of a unit holding int8 tensors: float tensors from offset 0, the stored bytes read at R.

    `extents` and `read_off` place the unit's stored bytes (its tensors and their scales) from slot
    offset 0; they move to R, a 4 KiB boundary (O_DIRECT wants an aligned buffer). The tensors the
    model sees are laid out 64-byte aligned from offset 0, in file order. runtime/dequant.expand first
    copies every scale aside, then handles the tensors in file order, each front to back in chunks,
    every chunk read whole before it is written.

    Why nothing is overwritten before it is read: say tensor k's stored bytes start at in_k (= R +
    read_off), its output at out_k, with n_k elements of s_k stored and e_k output bytes each (s=1,
    e=4 for int8 -> float32; s=e for a move). After a chunk ending at element b is written, the bytes
    still unread are tensor k's from in_k + s_k*b on, then the later tensors', which start past
    in_k + s_k*n_k (file order). The write ends at out_k + e_k*b, so it is enough that
        out_k + e_k*b <= in_k + s_k*b  for every b <= n_k,  i.e.  in_k >= out_k + (e_k - s_k) * n_k,
    (the worst b is n_k as e_k >= s_k) which also keeps it clear of the later tensors. Outputs of
    different tensors do not overlap, so a finished tensor is never touched again. R is the smallest
    4 KiB multiple meeting that for every k; the slot holds max(R + bytes read, float bytes).
    """
    order = sorted(tensors, key=lambda n: index.tensors[n].begin)
    out, grow, pos = {}, {}, 0
    for n in order:
        t = index.tensors[n]
        dtype, nbytes = seen_as(t, quant)
        pos = _up(pos, TENSOR_ALIGN)
        out[n], grow[n] = pos, nbytes - t.nbytes
        pos += nbytes
    shift = _up(max(0, max(out[n] + grow[n] - read_off[n] for n in order)), UNIT_ALIGN)
    read = sum(x.nbytes for x in extents)
    plan = []
    for n in order:
        t, q = index.tensors[n], quant.get(n)
        if q is not None:
            plan.append(Expand(n, shift + read_off[n], out[n], t.nbytes, t.shape, q.dtype, q.scale,
                               shift + read_off[q.scale], q.axis))
        elif shift + read_off[n] != out[n]:
            plan.append(Expand(n, shift + read_off[n], out[n], t.nbytes, t.shape, t.dtype))
    return UnitLayout(uid, tuple(Extent(x.file_off, x.nbytes, shift + x.slot_off) for x in extents),
                      tuple((n, out[n]) for n in tensors), _up(max(shift + read, pos), UNIT_ALIGN), data_end,
                      expand=tuple(plan))
