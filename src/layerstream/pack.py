"""`pack(src, out)`: rewrite a checkpoint into execution order, 4 KiB aligned, with a checksummed unit table.

Tensor by tensor, never the whole model in memory: each tensor is read from its source file, converted
if a dtype was asked for, hashed, and written at its place in a temporary file beside `out`; the
header's digests are filled in at the end, the file is synced and renamed over `out`. An interrupted
pack therefore leaves at most `out.partial-PID`, never a file named `out` that looks whole.

The order comes from the model when one is given (one streamed call at a small budget records the
order its modules really run in, and the units are cut and merged as the runtime would); without a
model it is the tensors' names in natural order (`h.2` before `h.10`), grouped by module, which is
execution order for almost every sequential network.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Callable

import torch
import xxhash

from .budget import fmt_bytes
from .capture import ST_TO_TORCH, TORCH_TO_ST
from .checkpoint import read_checkpoint, shard_of, shard_paths
from .errors import BudgetError, LayerstreamError
from .format import FileIndex, FileTensor, NoWeightFile
from .packfile import META_KEY, PackEntry, PackUnit, header_bytes, layout_pack
from .quant import scale_name
from .quantize import quantize_int8
from .units import parse_block

COPY_CHUNK = 16 * 2**20
DEFAULT_MAX_UNIT = 16 * 2**20
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
QUANTIZE = ("int8",)


class PackError(LayerstreamError, ValueError):
    """pack was asked for something it must refuse (overwriting its input, an unknown dtype...)."""


@dataclass(frozen=True)
class PackResult:
    path: str
    tensors: int
    units: int
    bytes_in: int
    bytes_out: int
    order: str  # "model" or "names"
    quantized: int = 0  # tensors stored as int8 (quant.py)
    quant_bytes_in: int = 0  # those tensors' bytes as the model sees them
    quant_bytes_out: int = 0  # their int8 bytes and scales as stored


def source_tensors(src: str) -> tuple[FileIndex, dict[str, str]]:
    """The validated index of a safetensors file or a Hugging Face folder (one virtual file if sharded)."""
    try:
        idx = read_checkpoint(src)
    except NoWeightFile as e:
        raise PackError(f"{e}; pack reads safetensors checkpoints only") from None
    return idx, dict(idx.metadata)


def _natural(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def units_by_name(names: list[str], nbytes: dict[str, int], max_unit: int) -> list[tuple[str, list[str]]]:
    """Natural name order, a unit per module (the name's prefix), consecutive modules merged up to max_unit."""
    groups: dict[str, list[str]] = {}
    for n in sorted(names, key=_natural):
        groups.setdefault(n.rpartition(".")[0], []).append(n)
    units: list[tuple[str, list[str]]] = []
    size = 0
    for mod, ts in groups.items():
        b = sum(nbytes[t] for t in ts)
        if units and size + b <= max_unit:
            units[-1] = (units[-1][0], units[-1][1] + ts)
            size += b
        else:
            units.append((mod or "<top>", ts))
            size = b
    return units


ORDER_UNIT = 1  # the cut that records the order: every module with weights is a unit of its own


def units_by_model(spec, weights: str, max_unit: int) -> tuple[list[tuple[str, list[str]]], tuple[str, ...]]:
    """The tensors in the order one streamed call of `spec` really used them, grouped up to `max_unit`.

    The order is recorded with a fine cut (ORDER_UNIT), not `max_unit`: a coarse unit keeps its
    tensors in registration order (ResNet registers a block's shortcut before the layers it runs
    after), which a finer cut at streaming time would then read in the wrong order.
    """
    from .meta import build_empty
    from .stream import stream

    inputs = spec.example_inputs()
    try:
        sm = stream(build_empty(spec.build), weights, budget="10%", max_unit=ORDER_UNIT)
    except BudgetError as e:
        sm = stream(build_empty(spec.build), weights, budget=e.minimum_bytes, max_unit=ORDER_UNIT)
    with sm:
        sm(*inputs)  # the first call records the order the modules really ran in
        prog = sm.cap.program
    # Back to the file's names where streaming renamed them to the model's (offsets do not change).
    raw = read_checkpoint(weights).tensors
    file_name = {(t.begin, t.end): n for n, t in raw.items()}
    named = {n: n if n in raw else file_name[(t.begin, t.end)] for n, t in sm.index.tensors.items()}
    roots = tuple(prog.root_order)
    units: list[tuple[str, list[str]]] = []
    placed: set[str] = set()
    size = 0
    for u in dict.fromkeys(prog.steps):
        # A row block stands for its whole tensor (its first block places it); a tied tensor: its first user.
        whole = list(dict.fromkeys((parse_block(t) or (t,))[0] for t in prog.units[u].tensors))
        ts = [named[t] for t in whole if named[t] not in placed]
        placed.update(ts)
        b = sum(sm.index.tensors[t].nbytes for t in whole if named[t] in ts)
        if not ts:
            continue
        name = prog.units[u].roots[0] if prog.units[u].mode == "block" else prog.units[u].name  # not one block's
        if units and size + b <= max_unit:
            units[-1] = (f"{units[-1][0].split('+')[0]}+{name}", units[-1][1] + ts)
            size += b
        else:
            units.append((name, ts))
            size = b
    return units, roots


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def quantizable(spec, index: FileIndex) -> dict[str, int]:
    """{file tensor name: channel axis} of the linear weights `spec`'s model lets pack store as int8."""
    from .meta import build_empty
    from .pretrained import align_to_model
    from .quantize import linear_weights

    model = build_empty(spec.build)
    aligned = align_to_model(index, model)
    stored = {(t.begin, t.end): n for n, t in index.tensors.items()}
    out = {}
    for name, axis in linear_weights(model).items():
        t = aligned.tensors.get(name)
        if t is not None and t.dtype in FLOAT_DTYPES and len(t.shape) == 2:
            out[stored[(t.begin, t.end)]] = axis
    return out


def pack(src: str | os.PathLike, out: str | os.PathLike, *, spec=None, dtype: str | None = None,
         quantize: str | None = None, max_unit: int = DEFAULT_MAX_UNIT, force: bool = False,
         progress: Callable[[int, int], None] | None = None) -> PackResult:
    """Write `src` (a safetensors file or HF folder) to the packed file `out`; see the module docstring.

    `spec` (a ModelSpec: build + example_inputs) gives the execution order; `dtype` ("float16",
    "bfloat16", "float32") converts floating tensors so nothing is converted at load time; `quantize`
    ("int8", needs `spec`) stores the model's unshared linear weights as int8 with per-channel scales,
    expanded after each read (quant.py): a quarter of the bytes to read, the same memory budget.
    """
    src, out = os.fspath(src), os.fspath(out)
    if dtype is not None and dtype not in DTYPES:
        raise PackError(f"dtype {dtype!r}: pack stores float32, float16 or bfloat16")
    if quantize is not None and quantize not in QUANTIZE:
        raise PackError(f"quantize {quantize!r}: pack quantizes to {', '.join(QUANTIZE)}")
    if quantize is not None and spec is None:
        raise PackError("--quantize int8 needs the model, to know which tensors are linear weights (and which "
                        "are tied to an embedding): pass --model zoo:NAME or package.module:function, or pack a "
                        "Hugging Face folder whose config.json names the model")
    index, meta = source_tensors(src)
    for path in shard_paths(index):
        if _same_file(path, out):
            raise PackError(f"{out} is pack's own input ({path}); write the pack to another path")
    if os.path.exists(out) and not force:
        raise PackError(f"{out} exists; pass force=True (--force) to replace it")
    tensors = index.tensors
    nbytes = {n: t.nbytes for n, t in tensors.items()}
    if spec is not None:
        units, roots = units_by_model(spec, src, max_unit)
        placed = {t for _, ts in units for t in ts}
        rest = [n for n in tensors if n not in placed]
        if rest:  # in the file but unused by the model: kept, after everything the model reads
            units += units_by_name(rest, nbytes, max_unit)
        order = "model"
    else:
        units, roots = units_by_name(list(tensors), nbytes, max_unit), ()
        order = "names"
    target = DTYPES.get(dtype) if dtype else None
    axes = quantizable(spec, index) if quantize else {}

    def seen(n: str) -> str:
        t = tensors[n]
        return target if target and t.dtype in FLOAT_DTYPES else t.dtype

    def entry(n: str) -> list[PackEntry]:
        t = tensors[n]
        if n in axes:  # int8, its scales right after it in the same unit
            numel = t.nbytes // _itemsize(t.dtype)
            return [PackEntry(n, "I8", t.shape, numel), PackEntry(scale_name(n), "F32", (t.shape[axes[n]],),
                                                                  4 * t.shape[axes[n]])]
        return [PackEntry(n, seen(n), t.shape, t.nbytes // _itemsize(t.dtype) * _itemsize(seen(n)))]

    lay = layout_pack([(name, [e for n in ts for e in entry(n)]) for name, ts in units])
    quant = {n: {"scale": scale_name(n), "dtype": seen(n), "axis": a} for n, a in axes.items()}
    meta = {k: v for k, v in meta.items() if k != META_KEY}
    meta.setdefault("format", "pt")  # transformers refuses safetensors files without it
    head = header_bytes(lay, meta, roots=roots, quant=quant)
    scales: dict[str, bytes] = {}  # an int8 tensor's scales, until they are written right after it

    def stored(n: str):
        if n in scales:
            yield scales.pop(n)
        elif n in axes:
            q, scale = quantize_int8(_whole(index, tensors[n], fds).view(tensors[n].shape), axes[n])
            scales[scale_name(n)] = scale.numpy().tobytes()
            yield q.numpy().tobytes()
        else:
            yield from _chunks(index, tensors[n], lay.entries[n].dtype, fds)
    tmp = f"{out}.partial-{os.getpid()}"
    fds: dict[str, int] = {}
    try:
        with open(tmp, "wb") as f:
            data_start = 8 + len(head)
            f.write(len(head).to_bytes(8, "little") + head)
            done, done_units = 0, []
            total = sum(e.nbytes for e in lay.entries.values())
            for u in lay.units:
                h, digests, pos = xxhash.xxh3_64(), [], u.begin
                for n in u.tensors:
                    gap = lay.offsets[n] - pos
                    h.update(bytes(gap))
                    f.seek(data_start + lay.offsets[n])
                    th = xxhash.xxh3_64()
                    for chunk in stored(n):
                        f.write(chunk)
                        h.update(chunk)
                        th.update(chunk)
                        done += len(chunk)
                        if progress:
                            progress(done, total)
                    digests.append(th.hexdigest())
                    pos = lay.offsets[n] + lay.entries[n].nbytes
                done_units.append(PackUnit(u.name, u.tensors, u.begin, u.end, h.hexdigest(), tuple(digests)))
            f.truncate(data_start + lay.data_bytes)  # trailing pads are holes that read as zeros
            final = header_bytes(lay, meta, tuple(done_units), roots, quant)
            assert len(final) == len(head), "digests are fixed-width: the header cannot change length"
            f.seek(8)
            f.write(final)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
        _fsync_dir(os.path.dirname(os.path.abspath(out)))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        for fd in fds.values():
            os.close(fd)
    q_in = sum(tensors[n].nbytes // _itemsize(tensors[n].dtype) * _itemsize(seen(n)) for n in axes)
    q_out = sum(lay.entries[n].nbytes + lay.entries[scale_name(n)].nbytes for n in axes)
    return PackResult(out, len(lay.entries), len(lay.units), sum(nbytes.values()),
                      os.path.getsize(out), order, len(axes), q_in, q_out)


def pack_folder(src: str, out: str, **kwargs) -> PackResult:
    """A HF folder -> a folder with the same config/tokenizer files and one packed model.safetensors."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise PackError(f"{out} exists and is not a folder; packing a folder writes a folder")
    if os.path.isdir(out) and _same_file(src, out):
        raise PackError(f"{out} is the folder being packed; write the pack to another folder")
    os.makedirs(out, exist_ok=True)
    result = pack(src, os.path.join(out, "model.safetensors"), **kwargs)
    for name in os.listdir(src):
        p = os.path.join(src, name)
        if os.path.isfile(p) and not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy2(p, os.path.join(out, name))
    return result


def _itemsize(dt: str) -> int:
    return torch.empty(0, dtype=ST_TO_TORCH[dt]).element_size()


def _whole(index: FileIndex, t: FileTensor, fds: dict[str, int]) -> torch.Tensor:
    """The tensor read whole, as stored (flat)."""
    raw = bytearray(b"".join(_chunks(index, t, t.dtype, fds)))
    return torch.frombuffer(raw, dtype=ST_TO_TORCH[t.dtype]) if raw else torch.empty(0, dtype=ST_TO_TORCH[t.dtype])


def _chunks(index: FileIndex, t: FileTensor, dtype: str, fds: dict[str, int]):
    """The tensor's bytes in `dtype`: copied in chunks, or read whole and converted."""
    base, path = shard_of(index, t.begin)
    fd = fds.get(path)
    if fd is None:
        fd = fds[path] = os.open(path, os.O_RDONLY)

    def read(n: int, off: int) -> bytes:
        b = os.pread(fd, n, off - base)
        if len(b) != n:
            raise PackError(f"{path}: tensor {t.name!r} is cut short at byte {off - base + len(b)}; "
                            "the file changed while packing")
        return b

    if dtype == t.dtype:
        for off in range(t.begin, t.end, COPY_CHUNK):
            yield read(min(COPY_CHUNK, t.end - off), off)
        return
    raw = bytearray(read(t.nbytes, t.begin))
    x = torch.frombuffer(raw, dtype=ST_TO_TORCH[t.dtype]) if raw else torch.empty(0, dtype=ST_TO_TORCH[t.dtype])
    conv = x.to(ST_TO_TORCH[dtype])
    assert TORCH_TO_ST[conv.dtype] == dtype
    yield conv.view(torch.uint8).numpy().tobytes()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe(r: PackResult) -> str:
    quant = (f"; {r.quantized} linear weights stored as int8 with per-channel scales: "
             f"{fmt_bytes(r.quant_bytes_in)} -> {fmt_bytes(r.quant_bytes_out)}") if r.quantized else ""
    return (f"packed {r.tensors} tensors in {r.units} units ({r.order} order): "
            f"{fmt_bytes(r.bytes_in)} -> {fmt_bytes(r.bytes_out)} at {r.path}{quant}")
