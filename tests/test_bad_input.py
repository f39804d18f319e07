"""Bad input of every kind ends in a named layerstream error whose message says what is wrong and how to
fix it; nothing crashes with a bare traceback from deep inside, and a failed stream() leaves no reader
thread and no file descriptor behind."""
from __future__ import annotations

import os
import re
import shutil
import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

import layerstream as ls
from conftest import assert_still_meta, nothing_left_open, open_fds, reader_threads
from layerstream import format as fmt
from layerstream.capture import capture
from layerstream.layout import unit_layout
from layerstream.plan import min_budget

SMALL_UNIT = 16 * 1024


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
    cap = capture(s.model(), index, SMALL_UNIT, gather=True, split=True)  # as stream() cuts
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
