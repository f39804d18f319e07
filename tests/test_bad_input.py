"""Bad input of every kind ends in a named layerstream error whose message says what is wrong and how to
fix it; nothing crashes with a bare traceback from deep inside, and a failed stream() leaves no reader
thread and no file descriptor behind."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import struct
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerstream as ls
from conftest import open_fds, reader_threads
from layerstream import format as fmt
from layerstream.capture import capture
from layerstream.layout import unit_layout
from layerstream.plan import min_budget

SMALL_UNIT = 16 * 1024


@contextlib.contextmanager
def nothing_left_open():
    """The body must fail; afterwards no layerstream thread is alive and the open fds are the same."""
    fds = open_fds()
    yield
    assert reader_threads() == [], f"threads left alive: {reader_threads()}"
    assert open_fds() == fds, f"fds opened and not closed: {open_fds() - fds}"


def assert_still_meta(model: torch.nn.Module) -> None:
    """A failed stream() gives nothing to the model: every parameter is still the meta one."""
    assert all(p.is_meta for p in model.parameters())


def small_model() -> torch.nn.Module:
    with ls.init_empty_weights():
        return torch.nn.Linear(2, 2)


def write_st(path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> str:
    """A safetensors file by hand: 8-byte little-endian header length, the JSON header, the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


# ---- budgets --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("512MB", 512 * 10**6),
    ("1.5GiB", 3 * 2**29),
    ("  2 kib ", 2048),
    ("4096", 4096),
    ("7b", 7),
    ("10%", 12345),  # of the weight bytes
    (" 50 %", 61728),
    (4096, 4096),
    (0, 0),
    (2.9, 2),
])
def test_budget_parses(text, expected):
    assert ls.parse_budget(text, weight_bytes=123456) == expected


@pytest.mark.parametrize("text", [
    "lots", "-5MB", "10 parsecs", True, False, -5, "", "%", "-5%", "0%", "nan%", "inf%", "1e400%",
    "1" * 400, "5 5MB", "1e3", float("inf"), float("nan"), None, [512],
])
def test_bad_budget_names_the_input(text):
    with pytest.raises(ls.BudgetError) as e:
        ls.parse_budget(text, weight_bytes=10**6)
    assert repr(text) in str(e.value), str(e.value)
    assert e.value.minimum_bytes is None


@pytest.mark.parametrize("budget", ["lots", "-5MB", "10 parsecs", True, "inf%"])
def test_bad_budget_through_stream(saved, budget):
    s = saved("tiny-gpt2")
    model = s.model()
    with nothing_left_open(), pytest.raises(ls.BudgetError, match="budget|byte size"):
        ls.stream(model, s.path, budget=budget)
    assert_still_meta(model)


@pytest.mark.parametrize("name", ["tiny-gpt2", "twice"])  # twice: the minimum includes a pinned unit
def test_one_byte_below_minimum_names_minimum_and_unit(saved, name):
    s = saved(name)
    # The minimum, worked out from the pure stages: pinned units + the largest streamed slot.
    index = fmt.read_index(s.path)
    cap = capture(s.model(), index, SMALL_UNIT)
    sizes = {u.uid: unit_layout(u, index).slot_nbytes for u in cap.program.units}
    need, big = min_budget(cap.program, sizes)
    pinned = sum(sizes[u.uid] for u in cap.program.units if u.pinned)
    assert big is not None and need == pinned + sizes[big]
    assert (pinned > 0) == (name == "twice")

    model = s.model()
    with nothing_left_open(), pytest.raises(ls.BudgetError) as e:
        ls.stream(model, s.path, budget=need - 1, max_unit=SMALL_UNIT)
    assert_still_meta(model)
    msg = str(e.value)
    assert e.value.minimum_bytes == need
    assert f"{need} bytes" in msg  # the minimum, in bytes
    assert f"unit {big} ({cap.program.units[big].name}," in msg  # the unit that sets it
    assert "raise the budget" in msg and "max_unit" in msg  # and how to fix it

    with ls.stream(s.model(), s.path, budget=need, max_unit=SMALL_UNIT) as sm:
        for _ in range(2):
            s.check(sm(*s.inputs))
        r = sm.report()
    assert r.loads_per_call > 0 and r.arena_peak_bytes <= r.arena_bytes <= need


# ---- weight files that do not match the model -----------------------------------------------------

def _mismatch(model, path) -> str:
    """stream() refuses with WeightMismatch, leaving nothing open and the model on meta; the message."""
    with nothing_left_open(), pytest.raises(ls.WeightMismatch) as e:
        ls.stream(model, path, budget="50%", max_unit=SMALL_UNIT)
    assert_still_meta(model)
    return str(e.value)


def test_file_missing_tensors(saved, tmp_path):
    s = saved("tiny-gpt2")
    tensors = load_file(s.path)
    gone = ["transformer.h.1.mlp.c_fc.weight", "transformer.ln_f.bias"]
    for n in gone:
        del tensors[n]
    path = str(tmp_path / "missing.safetensors")
    save_file(tensors, path)
    msg = _mismatch(s.model(), path)
    assert path in msg
    assert "2 model tensor(s) missing from the file" in msg
    assert all(n in msg for n in gone)
    assert "with a different dtype or shape" not in msg
    assert "build the model from the same config" in msg


def test_file_with_other_shapes(saved):
    import transformers
    s = saved("tiny-gpt2")
    with ls.init_empty_weights():  # tiny-gpt2's config but n_embd 32 instead of 64
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=512, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    n_tensors = len({id(p) for p in model.parameters()})
    msg = _mismatch(model, s.path)
    assert f"{n_tensors} tensor(s) with a different dtype or shape" in msg
    assert "transformer.wpe.weight: model F32[64, 32], file F32[64, 64]" in msg
    assert "transformer.h.0.attn.c_attn.weight: model F32[32, 96], file F32[64, 192]" in msg
    assert "missing from the file" not in msg
    assert "build the model from the same config" in msg


def test_file_with_other_dtype(saved, tmp_path):
    s = saved("twice")
    tensors = {k: v.half() for k, v in load_file(s.path).items()}
    path = str(tmp_path / "half.safetensors")
    save_file(tensors, path)
    msg = _mismatch(s.model(), path)
    assert f"{len(tensors)} tensor(s) with a different dtype or shape" in msg
    for name, t in tensors.items():
        assert f"{name}: model F32{list(t.shape)}, file F16{list(t.shape)}" in msg


def test_meta_device_build_with_nonpersistent_buffer(saved):
    from layerstream import zoo
    s = saved("tiny-llama")
    with torch.device("meta"):
        model = zoo.get("tiny-llama").build()
    with nothing_left_open(), pytest.raises(ls.MetaBufferError) as e:
        ls.stream(model, s.path, budget="50%", max_unit=SMALL_UNIT)
    msg = str(e.value)
    name = re.search(r"buffer '([^']+)'", msg).group(1)
    assert name.endswith("inv_freq")
    mod_path, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_path)
    assert attr in mod._non_persistent_buffers_set and mod._buffers[attr].is_meta
    assert "init_empty_weights" in msg
    # ...and the fix it names works.
    with ls.stream(s.model(), s.path, budget="50%", max_unit=SMALL_UNIT) as sm:
        s.check(sm(*s.inputs))


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


# ---- a file that changes under a running stream ---------------------------------------------------

def _call(sm, inputs, timeout=60.0):
    """Call `sm` on another thread so a hang fails the test instead of blocking it forever."""
    box = {}

    def run():
        try:
            box["out"] = sm(*inputs)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["err"] = e

    t = threading.Thread(target=run, name="test-call", daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"a streamed call hung for {timeout} s"
    if "err" in box:
        raise box["err"]
    return box["out"]


def _truncate_under_stream(s, sm, path):
    """Two good calls, then the file is cut on disk: the next call must raise, not hang."""
    for _ in range(2):
        s.check(_call(sm, s.inputs))
    assert sm.report().loads_per_call >= 8  # most units stream, so the cut is read after it happens
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises((ls.ReadError, ls.FormatError)) as e:
        _call(sm, s.inputs)
    assert path in str(e.value) and "truncated" in str(e.value)


def _stream_copy(saved, tmp_path):
    s = saved("tiny-gpt2")
    path = str(tmp_path / "copy.safetensors")
    shutil.copyfile(s.path, path)
    with nothing_left_open(), pytest.raises(ls.BudgetError) as e:
        ls.stream(s.model(), path, budget=1, max_unit=SMALL_UNIT)
    sm = ls.stream(s.model(), path, budget=e.value.minimum_bytes, max_unit=SMALL_UNIT)
    return s, sm, path


def test_file_truncated_while_streaming_raises_read_error(saved, tmp_path):
    fds = open_fds()
    s, sm, path = _stream_copy(saved, tmp_path)
    with sm:
        _truncate_under_stream(s, sm, path)
    assert reader_threads() == []
    assert open_fds() == fds


def test_stream_runs_again_after_file_restored(saved, tmp_path):
    s, sm, path = _stream_copy(saved, tmp_path)
    with open(path, "rb") as f:
        original = f.read()
    with sm:
        _truncate_under_stream(s, sm, path)
        with open(path, "r+b") as f:  # the same inode the reader holds open
            f.write(original)
        for _ in range(3):
            s.check(_call(sm, s.inputs))
        r = sm.report()
        assert r.arena_peak_bytes <= r.budget_bytes
    assert reader_threads() == []


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
