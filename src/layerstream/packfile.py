"""The packed-file layout and its unit table: where pack puts every tensor, and how a read is verified.

A packed file is a plain safetensors file whose tensors lie in execution order, grouped into units:
- every unit starts on a 4 KiB boundary (so one aligned O_DIRECT read covers it) and its tensors follow
  each other 64-byte aligned (so a view of any dtype is aligned);
- the safetensors reference loader wants the data covered with no holes, so alignment gaps are filled
  by zero-filled U8 tensors named `__layerstream_pad__.N` (loaders see them as extra keys);
- the header is padded with spaces so the data starts on a 4 KiB boundary;
- `__metadata__["layerstream"]` holds the unit table: per unit its data-relative byte range, an xxh3-64
  of those bytes, and each tensor's own xxh3-64 (so a stream cut that splits a unit is verified too).

Pure: no torch, no I/O. `pack.py` writes files with it; the runtime verifies reads with `checks_for`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .format import FileIndex, FormatError
from .units import UnitLayout

UNIT_ALIGN = 4096
TENSOR_ALIGN = 64
PAD_PREFIX = "__layerstream_pad__."
META_KEY = "layerstream"
VERSION = 1
HASH_HEX = 16  # xxh3-64 as 16 lowercase hex digits: fixed width, so the header's length is known up front
_NO_HASH = "0" * HASH_HEX
_HEX = re.compile(r"^[0-9a-f]{16}$")


class UnitTableCorrupt(FormatError):
    """The packed file's unit table does not agree with its tensors."""


@dataclass(frozen=True)
class PackEntry:
    """A tensor as it will be stored: its name, stored dtype and shape, and byte length."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class PackUnit:
    """A unit of a packed file: tensors stored back to back in [begin, end) (data-relative offsets)."""

    name: str
    tensors: tuple[str, ...]
    begin: int
    end: int
    digest: str = _NO_HASH
    tensor_digests: tuple[str, ...] = ()


@dataclass(frozen=True)
class PackLayout:
    """Every stored tensor's data-relative offset, the pads between them, and the units."""

    entries: dict[str, PackEntry]
    offsets: dict[str, int]  # tensor -> data-relative begin
    pads: tuple[tuple[str, int, int], ...]  # (pad tensor name, begin, nbytes)
    units: tuple[PackUnit, ...]
    data_bytes: int


def _up(x: int, a: int) -> int:
    return -(-x // a) * a


def layout_pack(units: list[tuple[str, list[PackEntry]]]) -> PackLayout:
    """Place `units` (in execution order) back to back: units page-aligned, tensors 64-byte aligned."""
    entries, offsets, pads, out = {}, {}, [], []
    pos = 0

    def pad_to(target: int) -> None:
        nonlocal pos
        if target > pos:
            pads.append((f"{PAD_PREFIX}{len(pads)}", pos, target - pos))
            pos = target

    for name, tensors in units:
        pad_to(_up(pos, UNIT_ALIGN))
        begin = pos
        for e in tensors:
            if e.name in entries:
                raise ValueError(f"tensor {e.name!r} is placed twice")
            pad_to(_up(pos, TENSOR_ALIGN))
            entries[e.name], offsets[e.name] = e, pos
            pos += e.nbytes
        out.append(PackUnit(name, tuple(e.name for e in tensors), begin, pos))
    return PackLayout(entries, offsets, tuple(pads), tuple(out), pos)


def header_bytes(lay: PackLayout, metadata: dict[str, str], units: tuple[PackUnit, ...] | None = None,
                 roots: tuple[str, ...] = (), quant: dict | None = None) -> bytes:
    """The safetensors header JSON, padded with spaces so the data starts on a 4 KiB boundary.

    Without `units` the digests are zero placeholders of the final width: pack writes this first,
    then the same-length header with the real digests once the data is written.
    """
    units = units or lay.units
    table = {"version": VERSION, "units": [
        [u.name, u.begin, u.end, u.digest, [[t, d] for t, d in zip(u.tensors, u.tensor_digests or
                                                                  (_NO_HASH,) * len(u.tensors))]]
        for u in units]}
    if roots:  # the module paths one call ran, in order (a model-ordered pack): the first call's guess
        table["roots"] = list(roots)
    if quant:  # int8 tensors and their scales (quant.py)
        table["quant"] = quant
    head: dict = {"__metadata__": {**metadata, META_KEY: json.dumps(table, separators=(",", ":"))}}
    items = [(n, lay.entries[n].dtype, list(lay.entries[n].shape), o, o + lay.entries[n].nbytes)
             for n, o in lay.offsets.items()]
    items += [(n, "U8", [k], b, b + k) for n, b, k in lay.pads]
    for n, dt, shape, b, e in sorted(items, key=lambda x: x[3]):
        head[n] = {"dtype": dt, "shape": shape, "data_offsets": [b, e]}
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (_up(8 + len(raw), UNIT_ALIGN) - 8 - len(raw))


def unit_table(index: FileIndex) -> tuple[PackUnit, ...] | None:
    """The validated unit table of a packed file (absolute offsets), or None if the file is not packed."""
    text = index.metadata.get(META_KEY)
    if text is None:
        return None

    def bad(why: str) -> UnitTableCorrupt:
        return UnitTableCorrupt(f"{index.path}: the layerstream unit table {why}; the file was changed "
                                "after packing or is corrupt: pack it again from its source")

    try:
        table = json.loads(text)
        if table.get("version") != VERSION:
            raise bad(f"has version {table.get('version')!r}, this layerstream reads version {VERSION}")
        units = []
        for name, b, e, digest, tensors in table["units"]:
            names = tuple(t for t, _ in tensors)
            digests = tuple(d for _, d in tensors)
            if not (isinstance(name, str) and all(isinstance(x, int) for x in (b, e))
                    and all(isinstance(d, str) and _HEX.match(d) for d in (digest, *digests))):
                raise bad(f"entry {name!r:.80} is malformed")
            units.append(PackUnit(name, names, index.data_start + b, index.data_start + e, digest, digests))
    except UnitTableCorrupt:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as ex:
        raise bad(f"is not valid ({type(ex).__name__}: {ex})") from None
    seen: set[str] = set()
    last = index.data_start
    for u in units:
        missing = [t for t in u.tensors if t not in index.tensors]
        if missing:
            raise bad(f"lists tensor {missing[0]!r} in unit {u.name!r}, which the file does not hold")
        if seen & set(u.tensors):
            raise bad(f"lists tensor {sorted(seen & set(u.tensors))[0]!r} in two units")
        seen |= set(u.tensors)
        if u.tensors:
            lo = min(index.tensors[t].begin for t in u.tensors)
            hi = max(index.tensors[t].end for t in u.tensors)
            if (lo, hi) != (u.begin, u.end):
                raise bad(f"gives unit {u.name!r} bytes [{u.begin}, {u.end}) but its tensors lie in [{lo}, {hi})")
        if u.begin < last or u.begin % UNIT_ALIGN:
            raise bad(f"places unit {u.name!r} at {u.begin}: units must be in file order and 4 KiB aligned")
        last = u.end
    return tuple(units)


def rename_units(table: tuple[PackUnit, ...], original: FileIndex, renamed: FileIndex) -> tuple[PackUnit, ...]:
    """The table in `renamed`'s names (the same file, tensors renamed to a model's), matched by offset.

    A tensor the renaming dropped keeps its file name: no stream unit holds it, so nothing checks it.
    """
    if renamed.tensors.keys() == original.tensors.keys():
        return table
    by_span = {(t.begin, t.end): n for n, t in renamed.tensors.items()}

    def new(name: str) -> str:
        t = original.tensors[name]
        return by_span.get((t.begin, t.end), name)

    return tuple(PackUnit(u.name, tuple(new(t) for t in u.tensors), u.begin, u.end, u.digest, u.tensor_digests)
                 for u in table)


def recorded_roots(index: FileIndex) -> tuple[str, ...]:
    """The module paths a model-ordered pack recorded one call running, in order; () if none."""
    try:
        roots = json.loads(index.metadata.get(META_KEY, "{}")).get("roots", [])
    except (ValueError, AttributeError):
        return ()  # unit_table() names what is wrong with the table
    return tuple(roots) if isinstance(roots, list) and all(isinstance(r, str) for r in roots) else ()


def tensor_digests(table: tuple[PackUnit, ...]) -> dict[str, str]:
    """Every tensor's own xxh3-64, by name."""
    return {t: d for u in table for t, d in zip(u.tensors, u.tensor_digests)}


@dataclass(frozen=True)
class Check:
    """Bytes of a unit's slot whose xxh3-64 must equal `digest` once the read has landed."""

    slot_off: int
    nbytes: int
    digest: str
    what: str  # "unit NAME" or "tensor NAME", for the error message


def checks_for(layout: UnitLayout, table: tuple[PackUnit, ...], index: FileIndex) -> tuple[Check, ...]:
    """What to verify after reading a stream unit: whole pack units where the stream unit holds them
    (one hash each), each tensor on its own where the stream cut splits a pack unit."""
    mine = {n for n, _ in layout.tensor_offsets} | {e.scale for e in layout.expand if e.scale}

    def where(t: str) -> int:  # where the read put the tensor's stored bytes (not where it is bound)
        b = index.tensors[t].begin
        x = next(x for x in layout.extents if x.file_off <= b <= x.file_off + x.nbytes)
        return x.slot_off + b - x.file_off

    checks, done = [], set()
    for pu in table:
        if not mine.intersection(pu.tensors):
            continue
        ext = next((x for x in layout.extents
                    if x.file_off <= pu.begin and pu.end <= x.file_off + x.nbytes), None)
        if set(pu.tensors) <= mine and ext is not None:
            checks.append(Check(ext.slot_off + pu.begin - ext.file_off, pu.end - pu.begin, pu.digest,
                                f"unit {pu.name}"))
            done.update(pu.tensors)
            continue
        for t, d in zip(pu.tensors, pu.tensor_digests):
            if t in mine and t not in done:
                checks.append(Check(where(t), index.tensors[t].nbytes, d, f"tensor {t}"))
                done.add(t)
    return tuple(checks)
