"""Reading and validating a safetensors file's header before a byte of its data is trusted.

Spec (safetensors): 8 bytes little-endian u64 N; N bytes of UTF-8 JSON; then the data. The JSON maps
each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets relative to the data
start; an optional "__metadata__" maps strings to strings. We check: N is bounded and inside the file,
the JSON is an object of well-formed entries, every dtype is known, end - begin equals the bytes of the
shape, every range lies inside the file, and no two ranges overlap. One named error per fault.
Nothing here ever unpickles.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import LayerstreamError

MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit: a larger header is a broken or hostile file

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1,
}


class FormatError(LayerstreamError, ValueError):
    """The weight file is not a valid safetensors file."""


class FileTooSmall(FormatError):
    """Shorter than the 8-byte header length field."""


class HeaderTooLarge(FormatError):
    """The header length field is past MAX_HEADER_BYTES or past the end of the file."""


class HeaderCorrupt(FormatError):
    """The header is not valid UTF-8 JSON of the expected shape."""


class UnknownDtype(FormatError):
    """A tensor's dtype code is not one safetensors defines."""


class SizeMismatch(FormatError):
    """A tensor's byte range does not match its shape and dtype."""


class TruncatedFile(FormatError):
    """A tensor's bytes lie past the end of the file: the file was cut short."""


class OverlappingTensors(FormatError):
    """Two tensors' byte ranges overlap."""


class CheckpointError(FormatError):
    """A Hugging Face checkpoint folder that is incomplete or disagrees with itself (see checkpoint.py)."""


class NoWeightFile(CheckpointError):
    """The folder has neither model.safetensors nor model.safetensors.index.json."""


class IndexCorrupt(CheckpointError):
    """model.safetensors.index.json is not JSON of the shape {"weight_map": {tensor: shard file}}."""


class MissingShard(CheckpointError):
    """The index names a shard file that is not in the folder."""


class ShardMismatch(CheckpointError):
    """The index places a tensor in a shard whose header does not hold it."""


class MissingConfig(CheckpointError):
    """The folder has no config.json (or one transformers cannot read), so the model cannot be built."""


@dataclass(frozen=True)
class FileTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileIndex:
    """A validated safetensors header: where every tensor lies in the file."""

    path: str
    file_size: int
    data_start: int
    tensors: dict[str, FileTensor]
    metadata: dict[str, str]
    # A sharded checkpoint read as one virtual file (checkpoint.py): (base offset, shard file) of each
    # shard, by base. Empty for a single file, whose offsets are the file's own.
    parts: tuple[tuple[int, str], ...] = ()


def read_index(path: str | os.PathLike) -> FileIndex:
    """Parse and validate the header of the safetensors file at `path`."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise FileTooSmall(f"{path}: {size} bytes is too short for a safetensors file (needs at "
                               "least the 8-byte header length); the file is cut short or not safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise HeaderTooLarge(f"{path}: header length {n} bytes is past "
                                 f"{'the 100 MiB limit' if n > MAX_HEADER_BYTES else f'the end of the {size}-byte file'}; "
                                 "the file is cut short or is not a safetensors file")
        raw = f.read(n)
    return parse_header(path, raw, size)


def parse_header(path: str, raw: bytes, file_size: int) -> FileIndex:
    """Validate a header's JSON bytes against a file of `file_size` bytes (pure, fuzzable)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, ints past Python's digit limit, deep nesting
        raise HeaderCorrupt(f"{path}: header is not valid UTF-8 JSON ({e}); the file is corrupt") from None
    if not isinstance(obj, dict):
        raise HeaderCorrupt(f"{path}: header is a JSON {type(obj).__name__}, not an object")
    data_start = 8 + len(raw)
    meta = obj.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise HeaderCorrupt(f"{path}: __metadata__ must map strings to strings")
    tensors: dict[str, FileTensor] = {}
    for name, e in obj.items():
        if not (isinstance(e, dict) and isinstance(e.get("dtype"), str) and isinstance(e.get("shape"), list)
                and isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                        for x in e["shape"] + e["data_offsets"])):
            raise HeaderCorrupt(f"{path}: entry {name!r} must be {{dtype: str, shape: [int], "
                                f"data_offsets: [begin, end]}} with non-negative ints, got {e!r:.200}")
        if e["dtype"] not in DTYPE_BYTES:
            raise UnknownDtype(f"{path}: tensor {name!r} has unknown dtype {e['dtype']!r}; "
                               f"known: {', '.join(DTYPE_BYTES)}")
        b, end = e["data_offsets"]
        numel = 1
        for d in e["shape"]:
            numel *= d
        if end < b or end - b != numel * DTYPE_BYTES[e["dtype"]]:
            raise SizeMismatch(f"{path}: tensor {name!r} {e['dtype']}{e['shape']} needs "
                               f"{numel * DTYPE_BYTES[e['dtype']]} bytes but data_offsets {e['data_offsets']} "
                               f"give {end - b}; the header is corrupt")
        if data_start + end > file_size:
            raise TruncatedFile(f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has "
                                f"{file_size} bytes; the file was cut short (copy or download it again)")
        tensors[name] = FileTensor(name, e["dtype"], tuple(e["shape"]), data_start + b, data_start + end)
    ranges = sorted((t.begin, t.end, t.name) for t in tensors.values() if t.end > t.begin)
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise OverlappingTensors(f"{path}: tensors {n0!r} [{b0}, {e0}) and {n1!r} [{b1}, {e1}) overlap; "
                                     "the header is corrupt or hostile")
    return FileIndex(path, file_size, data_start, tensors, dict(meta))
