"""A Session's one I/O backend: every model's reads through one AIO context or one thread pool.

Real files on disk, real kernel AIO contexts (counted in /proc/self/maps, where each io_setup maps its
ring as "/[aio]"), real reader threads (counted by name); every output is compared with eager.
"""
from __future__ import annotations

import errno

import pytest

import layerstream as ls
from conftest import open_fds, reader_threads
from layerstream.runtime import aio
from layerstream.runtime import io as io_mod
from test_session import BUDGET, THREE, accounted, make_session, run


def aio_contexts() -> int:
    with open("/proc/self/maps") as f:
        return sum("/[aio]" in line for line in f)


def cycle(s, saved, times: int = 4) -> None:
    for _ in range(times):  # past the learning calls: order, timed, serial, then a plan from costs
        for n in THREE:
            run(s, saved, n)
            accounted(s)


def test_aio_one_context_serves_three_models_and_close_leaves_nothing(saved):
    for n in THREE:
        saved(n)
    fds, threads, ctxs = open_fds(), reader_threads(), aio_contexts()
    s = make_session(saved, workload=THREE, io="aio")
    backends = {id(s._models[n]._io.backend) for n in THREE}
    assert backends == {id(s.io)} and isinstance(s.io, io_mod.AioIO)
    assert aio_contexts() == ctxs + 1
    cycle(s, saved)
    assert aio_contexts() == ctxs + 1  # re-plans restart executors, never the backend
    r = s.report()
    assert r.arena_peak_bytes <= r.budget_bytes == BUDGET
    assert {m.reader for m in r.models} == {"direct/aio"}
    assert sum(m.prefetched for m in r.models) > 0  # the next model's reads went through the same queue
    s.close()
    assert aio_contexts() == ctxs and reader_threads() == threads and open_fds() == fds


def test_threads_one_pool_for_three_models(saved):
    for n in THREE:
        saved(n)
    fds, threads = open_fds(), reader_threads()
    s = make_session(saved, workload=THREE, io="threads", workers=2)
    assert isinstance(s.io, io_mod.ThreadIO) and {id(s._models[n]._io.backend) for n in THREE} == {id(s.io)}
    cycle(s, saved)
    started = [t for t in reader_threads() if t not in threads]
    assert 1 <= len(started) <= 2, started  # one pool of 2, not 2 per model
    s.close()
    assert reader_threads() == threads and open_fds() == fds


def test_closing_one_model_leaves_the_shared_backend_open(saved):
    with make_session(saved, workload=THREE) as s:
        cycle(s, saved, 1)
        backend = s.io
        s._models["tiny-bert"].close()
        assert s.io is backend and s._models["tiny-bert"]._io is None
        run(s, saved, "tiny-gpt2")
        run(s, saved, "tiny-resnet")
        with pytest.raises(ls.ClosedError, match="tiny-bert"):
            s.run("tiny-bert", *saved("tiny-bert").inputs)
        run(s, saved, "tiny-gpt2")


def test_io_belongs_to_the_session(saved):
    with ls.Session(BUDGET) as s, pytest.raises(ValueError, match="belong to the session"):
        s.add("g", saved("tiny-gpt2").model(), saved("tiny-gpt2").path, io="threads")


@pytest.mark.parametrize("io", ["aio", "threads"])
def test_eio_on_one_models_file_fails_only_that_models_call(saved, monkeypatch, io):
    """EIO on tiny-bert's file, on its 3rd read: one tiny-bert call raises ReadError; every other call of
    every model, before and after, is correct, and the session goes on."""
    target = saved("tiny-bert").path
    s = make_session(saved, workload=THREE, io=io)
    fds = {s._models["tiny-bert"]._reader.fd}
    seen = {"n": 0}

    def hit() -> bool:
        seen["n"] += 1
        return seen["n"] == 3

    real_submit, real_read = aio.AioContext.submit, io_mod.DirectReader._read

    def submit(ctx, iocbs):  # io_submit fails for its first iocb, as the kernel reports it
        if iocbs[0].fildes in fds and hit():
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_submit(ctx, iocbs)

    def read(reader, dst, file_off):
        if reader.path == target and hit():
            raise OSError(errno.EIO, "Input/output error (injected)")
        return real_read(reader, dst, file_off)

    try:
        cycle(s, saved, 3)
        if io == "aio":
            monkeypatch.setattr(aio.AioContext, "submit", submit)
        else:
            monkeypatch.setattr(io_mod.DirectReader, "_read", read)
        failed = []
        for _ in range(3):
            for n in THREE:
                try:
                    run(s, saved, n)
                except ls.ReadError as e:
                    assert "Input/output error" in str(e) and target in str(e)
                    failed.append(n)
                accounted(s)
        assert failed == ["tiny-bert"] and seen["n"] > 3
        monkeypatch.undo()
        cycle(s, saved, 1)
        r = s.report()
        assert r.failed == 1 and {m.name: m.failed for m in r.models}["tiny-bert"] == 1
        assert r.arena_peak_bytes <= r.budget_bytes
    finally:
        s.close()
