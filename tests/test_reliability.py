"""Faults mid-run and concurrency: every failure is clean and the next call succeeds."""
from __future__ import annotations

import random
import threading

import pytest
import torch

import layerstream as ls
from conftest import open_fds, reader_threads

SMALL_UNIT = 16 * 1024


def _minimum(s) -> int:
    with pytest.raises(ls.BudgetError) as e:
        ls.stream(s.model(), s.path, budget=1, max_unit=SMALL_UNIT)
    return e.value.minimum_bytes


@pytest.mark.parametrize("io", ["aio", "threads"])
def test_eight_threads_two_hundred_calls(saved, io):
    s = saved("tiny-gpt2")
    fds, threads = open_fds(), reader_threads()
    errors: list[BaseException] = []
    sm = ls.stream(s.model(), s.path, budget=_minimum(s), max_unit=SMALL_UNIT, io=io)

    def worker():
        try:
            for _ in range(200):
                s.check(sm(*s.inputs))
        except BaseException as e:  # surfaced below, with the thread's own traceback
            errors.append(e)

    pool = [threading.Thread(target=worker) for _ in range(8)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in pool), "a caller hung"
    assert not errors, errors[0]
    r = sm.report()
    assert r.calls == 1600 and r.arena_peak_bytes <= r.budget_bytes
    sm.close()
    assert reader_threads() == threads and open_fds() == fds


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [KeyboardInterrupt, Boom])
def test_interrupt_at_random_points_then_next_call_succeeds(saved, exc):
    s = saved("tiny-bert")
    fds = open_fds()
    rng = random.Random(0)
    model = s.model()
    modules = [m for _, m in model.named_modules()]
    with ls.stream(model, s.path, budget=_minimum(s), max_unit=SMALL_UNIT) as sm:
        s.check(sm(*s.inputs))
        for _ in range(12):
            victim = rng.choice(modules)
            fire = [True]

            def hook(mod, args):
                if fire[0]:
                    fire[0] = False
                    raise exc("injected")

            h = victim.register_forward_pre_hook(hook)
            try:
                with pytest.raises(exc):
                    sm(*s.inputs)
            finally:
                h.remove()
            s.check(sm(*s.inputs))  # the arena and the schedule recover
            assert sm.report().arena_peak_bytes <= sm.report().budget_bytes
    assert open_fds() == fds and reader_threads() == []


def test_bad_input_to_forward_then_good_call(saved):
    s = saved("tiny-gpt2")
    with ls.stream(s.model(), s.path, budget="60%", max_unit=SMALL_UNIT) as sm:
        with pytest.raises((IndexError, RuntimeError)):
            sm(torch.full((1, 8), 10**6))  # token ids past the vocabulary
        s.check(sm(*s.inputs))


@pytest.mark.parametrize("io", ["aio", "threads"])
@pytest.mark.parametrize("nth", [1, 5, 17])
def test_read_failing_on_its_nth_read(saved, monkeypatch, io, nth):
    """An I/O error (EIO) on the Nth read: that call raises ReadError, the next calls are correct."""
    import errno

    from layerstream.runtime import aio, io as io_mod
    s = saved("tiny-gpt2")
    count = {"n": 0}

    def failing(real):
        def wrapped(*args, **kwargs):
            count["n"] += 1
            if count["n"] == nth:
                raise OSError(errno.EIO, "Input/output error (injected)")
            return real(*args, **kwargs)
        return wrapped

    fds = open_fds()
    with ls.stream(s.model(), s.path, budget=_minimum(s), max_unit=SMALL_UNIT, io=io) as sm:
        for _ in range(3):  # learn the order and the costs first
            s.check(sm(*s.inputs))
        if io == "aio":
            monkeypatch.setattr(aio.AioContext, "submit", failing(aio.AioContext.submit))
        else:
            monkeypatch.setattr(io_mod.DirectReader, "_read", failing(io_mod.DirectReader._read))
        failed = 0
        for _ in range(nth + 2):  # enough calls for the Nth read to happen
            try:
                s.check(sm(*s.inputs))
            except ls.ReadError as e:
                assert "Input/output error" in str(e)
                failed += 1
        assert failed == 1
        monkeypatch.undo()
        s.check(sm(*s.inputs))
        assert sm.report().arena_peak_bytes <= sm.report().budget_bytes
    assert open_fds() == fds and reader_threads() == []
