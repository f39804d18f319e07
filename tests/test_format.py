"""Files that are not valid safetensors: each fault ends in its named FormatError, and a fuzzed header
parser never lets anything else escape."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct

import pytest

import layerstream as ls
from conftest import assert_still_meta, nothing_left_open, small_model, write_st
from layerstream import format as fmt

SMALL_UNIT = 16 * 1024


# ---- files that are not valid safetensors ---------------------------------------------------------

def _data_start(path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


@pytest.mark.parametrize("where, error", [
    ("empty", fmt.FileTooSmall),
    ("in the length", fmt.FileTooSmall),
    ("just the length", fmt.HeaderTooLarge),
    ("in the header", fmt.HeaderTooLarge),
    ("in the data", fmt.TruncatedFile),
    ("one byte short", fmt.TruncatedFile),
])
def test_file_cut_short(saved, tmp_path, where, error):
    s = saved("tiny-gpt2")
    path = str(tmp_path / "cut.safetensors")
    shutil.copyfile(s.path, path)
    size, start = os.path.getsize(path), _data_start(path)
    cut = {"empty": 0, "in the length": 5, "just the length": 8, "in the header": (8 + start) // 2,
           "in the data": (start + size) // 2, "one byte short": size - 1}[where]
    os.truncate(path, cut)
    model = s.model()
    with nothing_left_open(), pytest.raises(ls.FormatError) as e:
        ls.stream(model, path, budget="50%", max_unit=SMALL_UNIT)
    assert type(e.value) is error
    assert path in str(e.value)
    assert "cut short" in str(e.value)  # what is wrong, and so what to do: get a whole copy
    assert_still_meta(model)


def test_missing_file_names_the_path(tmp_path):
    path = str(tmp_path / "nope.safetensors")
    with nothing_left_open(), pytest.raises(FileNotFoundError, match=re.escape(path)):
        ls.stream(small_model(), path, budget="1MB")


F32x4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize("header, data, length, error, says", [
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]', bytes(16), None,
     fmt.HeaderCorrupt, "not valid UTF-8 JSON"),
    (b'\xff\xfe{}', b"", None, fmt.HeaderCorrupt, "not valid UTF-8 JSON"),
    (b"[1, 2]", b"", None, fmt.HeaderCorrupt, "not an object"),
    ({"w": {"dtype": "F32", "shape": [4]}}, bytes(16), None, fmt.HeaderCorrupt, "'w' must be"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16), None,
     fmt.HeaderCorrupt, "non-negative"),
    ({"__metadata__": {"a": 1}, "w": F32x4}, bytes(16), None, fmt.HeaderCorrupt, "__metadata__"),
    ({"w": {"dtype": "F33", "shape": [4], "data_offsets": [0, 16]}}, bytes(16), None,
     fmt.UnknownDtype, "unknown dtype 'F33'"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, bytes(16), None,
     fmt.SizeMismatch, "needs 16 bytes"),
    ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]}}, bytes(16), None,
     fmt.SizeMismatch, "'w'"),
    ({"a": F32x4, "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), None,
     fmt.OverlappingTensors, "'a' ["),
    ({"w": F32x4}, bytes(15), None, fmt.TruncatedFile, "cut short"),
    ({"w": F32x4}, bytes(16), 2**40, fmt.HeaderTooLarge, "100 MiB limit"),
    ({"w": F32x4}, bytes(16), 10**6, fmt.HeaderTooLarge, "past the end of the"),
])
def test_hand_made_bad_header(tmp_path, header, data, length, error, says):
    path = write_st(tmp_path / "bad.safetensors", header, data, length)
    model = small_model()
    with nothing_left_open(), pytest.raises(ls.FormatError) as e:
        ls.stream(model, path, budget="1MB")
    assert type(e.value) is error, repr(e.value)
    assert path in str(e.value)
    assert says in str(e.value), str(e.value)
    assert_still_meta(model)


def test_hand_made_good_header_is_accepted(tmp_path):
    """The writer above makes valid files: the same shapes with sane offsets parse."""
    path = write_st(tmp_path / "ok.safetensors",
                    {"__metadata__": {"format": "pt"}, "a": F32x4,
                     "b": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [16, 28]},
                     "z": {"dtype": "I8", "shape": [0], "data_offsets": [28, 28]}}, bytes(28))
    idx = fmt.read_index(path)
    start = idx.data_start
    assert idx.metadata == {"format": "pt"}
    assert idx.tensors["b"] == fmt.FileTensor("b", "BF16", (2, 3), start + 16, start + 28)
    assert idx.tensors["a"].nbytes == 16 and idx.tensors["z"].nbytes == 0
    assert idx.file_size == start + 28 == os.path.getsize(path)


def test_pathological_json_is_header_corrupt():
    """Deep nesting and huge integers make json.loads raise RecursionError / ValueError, not
    JSONDecodeError; a hostile header must still end in HeaderCorrupt."""
    for raw in [b"[" * 100_000, b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}']:
        with pytest.raises(fmt.HeaderCorrupt):
            fmt.parse_header("x.safetensors", raw, 10**9)



# ---- fuzzing the header parser --------------------------------------------------------------------

def _valid_header() -> tuple[bytes, int]:
    header = {"__metadata__": {"format": "pt"},
              "emb.weight": {"dtype": "F32", "shape": [8, 4], "data_offsets": [0, 128]},
              "emb.bias": {"dtype": "F16", "shape": [4], "data_offsets": [128, 136]},
              "mask": {"dtype": "BOOL", "shape": [2, 2, 2], "data_offsets": [136, 144]},
              "ids": {"dtype": "I64", "shape": [3], "data_offsets": [144, 168]}}
    raw = json.dumps(header).encode()
    return raw, 8 + len(raw) + 168


def _check_parse(raw: bytes, size: int, seen: dict) -> None:
    try:
        idx = fmt.parse_header("fuzz.safetensors", raw, size)
    except fmt.FormatError as e:
        assert "fuzz.safetensors" in str(e)
        seen[type(e)] = seen.get(type(e), 0) + 1
        return
    except BaseException as e:  # noqa: BLE001
        pytest.fail(f"parse_header raised {type(e).__name__}: {e} on raw={raw[:300]!r} size={size}")
    seen[fmt.FileIndex] = seen.get(fmt.FileIndex, 0) + 1
    assert isinstance(idx, fmt.FileIndex) and idx.data_start == 8 + len(raw)
    spans = []
    for t in idx.tensors.values():  # whatever parses is safe to read
        n = fmt.DTYPE_BYTES[t.dtype]
        for d in t.shape:
            n *= d
        assert idx.data_start <= t.begin <= t.end <= size and t.nbytes == n
        spans.append((t.begin, t.end))
    spans = sorted(s for s in spans if s[1] > s[0])
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _random_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(9 if depth < 2 else 6)
    if pick == 0:
        return rng.randrange(-3, 300)
    if pick == 1:
        return rng.choice(["F32", "F16", "BF16", "I64", "BOOL", "U8", "F33", "", "f32"])
    if pick == 2:
        return rng.choice([None, True, False, 1.5, 2**70, -1])
    if pick == 3:
        return [rng.randrange(0, 9) for _ in range(rng.randrange(4))]
    if pick == 4:
        a = rng.randrange(0, 200)
        return [a, a + rng.choice([0, 4, 8, 16, 32, rng.randrange(64)])]
    if pick == 5:
        return rng.randrange(0, 64)
    if pick == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {rng.choice(["dtype", "shape", "data_offsets", "x"]): _random_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _random_entry(rng: random.Random):
    """Mostly well-formed entries with one field sometimes replaced: reaches every later check."""
    dtype = rng.choice(["F32", "F16", "U8", "I64", "BOOL", "F8_E4M3"] * 3 + ["F33", "float"])
    shape = [rng.randrange(0, 5) for _ in range(rng.randrange(3))]
    n = fmt.DTYPE_BYTES.get(dtype, 1)
    for d in shape:
        n *= d
    begin = rng.randrange(0, 96)
    e = {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + n + rng.choice([0] * 6 + [-1, 1])]}
    if rng.random() < 0.2:
        e[rng.choice(list(e))] = _random_value(rng)
    return e


def _mutate(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(5)
        if op == 0 and b:  # bit flip
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1:  # truncation
            del b[rng.randrange(len(b) + 1):]
        elif op == 2 and b:  # deletion
            del b[rng.randrange(len(b))]
        elif op == 3:  # insertion of a JSON-ish byte
            b.insert(rng.randrange(len(b) + 1), rng.choice(b'{}[]",:0123456789-e. \\\x00\xff'))
        else:  # a digit replaced by other digits
            digits = [i for i, c in enumerate(b) if 48 <= c <= 57]
            if digits:
                i = rng.choice(digits)
                b[i:i + 1] = str(rng.randrange(10**rng.randrange(1, 6))).encode()
    return bytes(b)


def test_parse_header_fuzz_seeded():
    rng = random.Random(1234)
    raw0, size0 = _valid_header()
    seen: dict = {}
    _check_parse(raw0, size0, seen)
    assert seen == {fmt.FileIndex: 1}
    for i in range(2000):
        kind = i % 4
        if kind == 0:
            raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
            if rng.random() < 0.5:
                raw = b"{" + raw
        elif kind == 1:
            raw = _mutate(rng, raw0)
        elif kind == 2:
            header = {f"t{j}": _random_entry(rng) for j in range(rng.randrange(1, 5))}
            if rng.random() < 0.2:
                header["__metadata__"] = _random_value(rng)
            raw = json.dumps(header).encode()
        else:
            raw = json.dumps(_random_value(rng)).encode()
        size = 8 + len(raw) + rng.choice([0, 64, 168, 200, 500, rng.randrange(400)])
        _check_parse(raw, size, seen)
    # The generator reaches every outcome, so a parser that raises the wrong thing on any path fails.
    for outcome in [fmt.FileIndex, fmt.HeaderCorrupt, fmt.UnknownDtype, fmt.SizeMismatch,
                    fmt.TruncatedFile, fmt.OverlappingTensors]:
        assert seen.get(outcome, 0) >= 5, (outcome, seen)


def test_parse_header_fuzz_hypothesis():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    raw0, size0 = _valid_header()
    seen: dict = {}

    @hypothesis.settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @hypothesis.given(raw=st.one_of(
        st.binary(max_size=200),
        st.builds(lambda cut, flips: _apply(raw0, cut, flips),
                  st.integers(0, len(raw0)),
                  st.lists(st.tuples(st.integers(0, len(raw0) - 1), st.integers(0, 7)), max_size=3)),
    ), extra=st.integers(0, 500))
    def check(raw, extra):
        _check_parse(raw, 8 + len(raw) + extra, seen)

    check()
    assert seen.get(fmt.HeaderCorrupt, 0) > 0


def _apply(raw: bytes, cut: int, flips: list[tuple[int, int]]) -> bytes:
    b = bytearray(raw)
    for i, bit in flips:
        b[i] ^= 1 << bit
    return bytes(b[:cut] if cut < len(b) else b)
