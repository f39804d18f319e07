"""Sessions: several models, one budget, one shared ring, calls from several threads.

Every output is compared bit for bit with the model's eager output; the arena's own accounting is
checked against the budget and against what the executors hold.
"""
from __future__ import annotations

import json
import random
import threading
import time

import pytest
import torch

import layerstream as ls
from conftest import nothing_left_open, open_fds, reader_threads
from layerstream.cli import main as cli_main
from layerstream.plan.workload import min_session_budget

THREE = ["tiny-gpt2", "tiny-resnet", "tiny-bert"]
SMALL_UNIT = 16 * 1024
BUDGET = 400_000  # below tiny-gpt2's weights alone (535 KiB), a third of the three together


def make_session(saved, budget=BUDGET, workload=None, names=THREE, **kwargs) -> ls.Session:
    s = ls.Session(budget, workload=workload, **kwargs)
    try:
        for n in names:
            s.add(n, saved(n).model(), saved(n).path, max_unit=SMALL_UNIT)
    except BaseException:
        s.close()
        raise
    return s


def accounted(s: ls.Session) -> None:
    """The arena's live bytes are exactly every model's residents plus the ring loads they hold."""
    models = [s._models[n] for n in s.models]
    want = sum(m.sizes[u] for m in models for u, _ in m.plan.resident)
    want += sum(ld.nbytes for m in models for ld in m._exec.live)
    assert s.arena.live_bytes == want
    assert s.arena.peak_bytes <= s.arena.nbytes == s.budget_bytes


def run(s, saved, name):
    out = s.run(name, *saved(name).inputs)
    saved(name).check(out)
    return out


# ---- three architectures, one budget ------------------------------------------------------------
def test_fixed_cycle_prefetches_the_next_model(saved):
    assert BUDGET < saved("tiny-gpt2").weight_bytes
    with make_session(saved, workload=THREE) as s:
        for _ in range(3):  # the learning calls: order, timed, serial; then a plan from costs
            for n in THREE:
                run(s, saved, n)
        before = s.report()
        assert all(s._models[n].costs is not None for n in THREE), "learning did not finish"
        assert before.out_of_order == 0
        for _ in range(3):
            for n in THREE:
                time.sleep(0.02)  # a gap between calls: the next model's first reads land in it
                run(s, saved, n)
            accounted(s)
        after = s.report()
    streaming = 0
    for b, a in zip(before.models, after.models):
        assert a.calls == b.calls + 3
        assert a.demand_misses == b.demand_misses, f"{a.name}: a planned order still missed"
        assert a.out_of_order == 0
        assert 0 < a.arena_peak_bytes <= after.arena_peak_bytes <= after.budget_bytes
        if a.loads_per_call:  # (a model the plan keeps wholly resident has nothing to read ahead)
            streaming += 1
            assert a.prefetched == b.prefetched + 3, f"{a.name}: not every warm call was read ahead"
            assert a.prefetched_bytes > b.prefetched_bytes, f"{a.name}: nothing had landed when its call began"
    assert streaming >= 2
    assert after.arena_peak_bytes <= after.budget_bytes


def test_out_of_order_call_is_counted_correct_and_drops_the_guess(saved):
    cycle = ["tiny-gpt2", "tiny-bert", "tiny-resnet"]
    with make_session(saved, workload=cycle) as s:
        gpt2, bert = s._models["tiny-gpt2"], s._models["tiny-bert"]
        for n in cycle * 3 + cycle[:1]:  # past the learning calls (a serial timing call reads nothing ahead)
            run(s, saved, n)
        assert gpt2.plan.loads and bert.plan.loads, "both must stream for this test to mean anything"
        assert bert._exec.inflight, "the model expected next was not read ahead"
        run(s, saved, "tiny-resnet")  # bert was expected
        assert not bert._exec.inflight, "the wrong guess still holds ring bytes"
        assert gpt2._exec.inflight, "after resnet the cycle expects gpt2"
        run(s, saved, "tiny-gpt2")
        r = {m.name: m for m in s.report().models}
        assert [r[n].out_of_order for n in cycle] == [0, 0, 1]
        accounted(s)


def test_random_order_learned_workload(saved):
    rng = random.Random(1)
    with make_session(saved) as s:
        for _ in range(18):
            run(s, saved, rng.choice(THREE))
            accounted(s)
        r = s.report()
    assert r.calls == 18 and r.workload == "learned from the calls"
    assert r.arena_peak_bytes <= r.budget_bytes


def test_four_threads_results_to_the_right_caller_and_a_bad_input_harms_no_one(saved):
    for n in THREE:
        saved(n)  # eager references made before the threads start
    s = make_session(saved, io="threads")
    errors: list[BaseException] = []
    bad_raised = []
    start = threading.Barrier(4)

    def worker(seed: int):
        rng = random.Random(seed)
        try:
            start.wait()
            for i in range(6):
                if seed == 0 and i == 2:  # a token past the vocabulary: this call fails, alone
                    with pytest.raises(IndexError):
                        s.run("tiny-gpt2", torch.full((1, 16), 10_000))
                    bad_raised.append(True)
                    continue
                run(s, saved, rng.choice(THREE))
        except BaseException as e:  # surfaced below with its own traceback
            errors.append(e)

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    try:
        assert not any(t.is_alive() for t in pool), "a caller hung"
        assert not errors, errors[0]
        assert bad_raised == [True]
        r = s.report()
        assert r.calls == 23 and r.failed == 1
        assert r.arena_peak_bytes <= r.budget_bytes
        accounted(s)
    finally:
        s.close()


def test_turns_are_first_come_first_served():
    turns = ls.session.Turns()
    order: list[int] = []

    def take(i: int) -> None:
        with turns.turn(str(i)):
            order.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(6)]
    with turns.turn("first"):
        for i, t in enumerate(threads):
            t.start()
            while len(turns._queue) < i + 2:  # each has queued before the next starts
                time.sleep(0.001)
        assert turns.next_waiting() == "0" and order == []
    for t in threads:
        t.join(timeout=10)
    assert order == list(range(6))


# ---- small budgets ----------------------------------------------------------------------------
def test_budget_below_the_largest_model_runs_every_model_down_to_the_minimum(saved):
    with make_session(saved) as s:
        need, _ = min_session_budget(s._demands())
    assert need < min(saved(n).weight_bytes for n in ("tiny-gpt2", "tiny-bert"))
    with make_session(saved, budget=need, workload=THREE) as s:
        for _ in range(2):
            for n in THREE:
                run(s, saved, n)
        r = s.report()
        assert r.ring_bytes == need and r.resident_bytes == 0
        assert r.arena_peak_bytes <= need
        accounted(s)
    with nothing_left_open(), pytest.raises(ls.BudgetError) as e:
        make_session(saved, budget=need - 1)
    assert e.value.minimum_bytes == need


# ---- failures -----------------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_a_failing_forward_leaves_the_others_working(saved):
    with make_session(saved, workload=THREE) as s:
        bert = s._models["tiny-bert"]
        fire = [True]

        def hook(mod, args):
            if fire[0]:
                fire[0] = False
                raise Boom("injected")

        for n in THREE:
            run(s, saved, n)
        h = bert.model.encoder.layer[1].register_forward_pre_hook(hook)
        run(s, saved, "tiny-gpt2")
        run(s, saved, "tiny-resnet")
        with pytest.raises(Boom):
            s.run("tiny-bert", *saved("tiny-bert").inputs)
        h.remove()
        accounted(s)
        for _ in range(2):
            for n in THREE:
                run(s, saved, n)
        r = s.report()
        assert r.failed == 1 and r.calls == 11
        accounted(s)


def test_close_leaves_nothing_open_and_refuses_calls(saved):
    for n in THREE:
        saved(n)
    fds, threads = open_fds(), reader_threads()
    s = make_session(saved, io="threads")
    sm = s._models["tiny-bert"]
    saved("tiny-bert").check(sm(*saved("tiny-bert").inputs))  # the handle add() returns goes through the session
    run(s, saved, "tiny-gpt2")
    s.close()
    s.close()
    assert reader_threads() == threads and open_fds() == fds
    with pytest.raises(ls.ClosedError):
        s.run("tiny-gpt2", *saved("tiny-gpt2").inputs)
    with ls.Session(BUDGET) as empty, pytest.raises(KeyError, match="added: none"):
        empty.run("nope")


def test_bad_session_arguments(saved):
    with pytest.raises(ls.BudgetError, match="give bytes"):
        ls.Session("25%")
    with make_session(saved, names=["tiny-resnet"]) as s:
        with pytest.raises(ValueError, match="already in this session"):
            s.add("tiny-resnet", saved("tiny-resnet").model(), saved("tiny-resnet").path)
        with pytest.raises(KeyError, match="added: tiny-resnet"):
            s.run("tiny-gpt2")


# ---- the CLI --------------------------------------------------------------------------------------
def test_cli_session_runs_a_workload_file(saved, tmp_path, capsys):
    toml = tmp_path / "work.toml"
    toml.write_text("\n".join([
        'budget = "60%"', 'cycle = ["gpt2", "resnet"]', "repeats = 2", 'max_unit = "16KiB"',
        "[[model]]", 'name = "gpt2"', 'model = "zoo:tiny-gpt2"', f'weights = "{saved("tiny-gpt2").path}"',
        "[[model]]", 'name = "resnet"', 'model = "zoo:tiny-resnet"', f'weights = "{saved("tiny-resnet").path}"',
    ]))
    out = tmp_path / "r.json"
    assert cli_main(["session", str(toml), "--check", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| gpt2 | 2 |" in text and "gpt2: outputs equal to eager: yes" in text
    r = json.loads(out.read_text())
    assert r["budget_bytes"] == int(saved("tiny-gpt2").weight_bytes * 60 / 100)
    assert len(r["cycles_ms"]) == 2 and [m["calls"] for m in r["models"]] == [2, 2]
    toml.write_text('budget = "1MB"\ncycle = ["b"]\n[[model]]\nname = "a"\nmodel = "zoo:tiny-gpt2"\n')
    assert cli_main(["session", str(toml)]) == 2
    assert "must list model names from: a" in capsys.readouterr().err


def test_a_session_call_inside_a_session_call_refuses_instead_of_hanging(saved):
    with make_session(saved, names=["tiny-resnet", "tiny-gpt2"]) as s:
        resnet = s._models["tiny-resnet"]
        h = resnet.model.register_forward_pre_hook(lambda mod, args: s.run("tiny-gpt2", *saved("tiny-gpt2").inputs))
        with pytest.raises(RuntimeError, match="would wait for itself"):
            s.run("tiny-resnet", *saved("tiny-resnet").inputs)
        h.remove()
        run(s, saved, "tiny-resnet")
        run(s, saved, "tiny-gpt2")
        accounted(s)


def test_generate_in_a_session_equals_eager_and_keeps_the_budget(saved):
    """generate() through a session: eager's tokens, the budget kept, one call counted, others still exact."""
    from layerstream.eager import load_eager
    g = saved("tiny-gpt2")
    ref = load_eager(g.model(), g.path)
    ids = g.inputs[0][:, :8]
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = ref.generate(ids, **kw)
    with make_session(saved) as s:
        run(s, saved, "tiny-bert")
        got = s.generate("tiny-gpt2", ids, **kw)
        assert torch.equal(got, want)
        assert torch.equal(s._models["tiny-gpt2"].generate(ids, **kw), want)  # the model's own generate()
        run(s, saved, "tiny-resnet")
        run(s, saved, "tiny-gpt2")
        accounted(s)
        assert s._models["tiny-gpt2"].report().generation.steps == 6
        assert s.predictor.calls["tiny-gpt2"] == 3  # generate() twice and a run: three calls of the workload
        rep = s.report()
        assert rep.arena_peak_bytes <= s.budget_bytes
        with pytest.raises(KeyError, match="no model named 'nope'"):
            s.generate("nope", ids)


def test_generate_reads_no_other_model_ahead_between_its_steps(saved):
    """A generate() holds the turn: prefetching the next model after each step would be thrown away."""
    g = saved("tiny-gpt2")
    with make_session(saved, workload=THREE) as s:
        for n in THREE:
            run(s, saved, n)
        gpt = s._models["tiny-gpt2"]
        ahead = []  # the other models' loads in flight as each step ends
        hook = gpt.model.register_forward_hook(
            lambda *_: ahead.append(sum(len(m._exec.inflight) for m in s._models.values() if m is not gpt)))
        try:
            s.generate("tiny-gpt2", g.inputs[0][:, :8], max_new_tokens=6, do_sample=False, pad_token_id=0)
        finally:
            hook.remove()
        assert len(ahead) == 6 and ahead == [0] * 6
        assert s._expected == "tiny-resnet" and any(ld for ld in s._models["tiny-resnet"]._exec.inflight.values())
        run(s, saved, "tiny-resnet")
        run(s, saved, "tiny-gpt2")
        accounted(s)
