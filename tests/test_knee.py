"""The knee found again with costs fitted to a real stream's calls at it (knee.py)."""
from __future__ import annotations

import torch
from torch import nn

from layerstream import zoo
from layerstream.knee import KNEE_ROUNDS, calibrate_knee
from layerstream.plan.tradeoff import KNEE, sweep
from layerstream.profile import Profile, cache_root, load_or_profile


def _mlp_spec() -> zoo.ModelSpec:
    """Eight 256x256 linears fed 2048 rows: each step computes far longer than its 256 KiB read, so
    reads hide below the whole model and the knee streams something."""
    def inputs():
        return (torch.randn(2048, 256, generator=torch.Generator().manual_seed(0)),)
    return zoo.ModelSpec("knee-mlp", lambda: nn.Sequential(*[nn.Linear(256, 256) for _ in range(8)]).eval(),
                         inputs, "a compute-heavy stack of linears")


def test_the_knee_is_found_again_with_costs_fitted_to_calls_at_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERSTREAM_CACHE", str(tmp_path / "cache"))
    spec = _mlp_spec()
    weights = tmp_path / "mlp.safetensors"
    zoo.save_weights(spec, weights)
    prof, _, _ = load_or_profile(spec, weights, "25%", log=None)
    frontier = sweep(prof.program, prof.sizes, prof.costs, steps=6)
    assert frontier.knee_bytes < frontier.weight_bytes
    said: list[str] = []
    out = calibrate_knee(spec, weights, prof, frontier, steps=6, log=said.append)

    assert 1 <= sum(ln.startswith("fitting the cost model to calls at the knee") for ln in said) <= KNEE_ROUNDS
    knee = out.knee_point
    assert knee.fitted_at is not None and knee.predicted_ms <= KNEE * out.knee_compute_ms
    # The costs the knee was found with are the stream's, learned by its calls at `fitted_at` and kept in
    # its cache: swept with them, the knee is the same point.
    entries = [Profile.from_json(p.read_text()) for p in cache_root().glob("Sequential-*.json")]
    fitted = [e for e in entries if e.key.get("budget") == knee.fitted_at]
    assert len(fitted) == 1
    again = sweep(prof.program, prof.sizes, fitted[0].costs, steps=6)
    assert again.knee_bytes == knee.budget_bytes
    assert again.knee_point.predicted_ms == knee.predicted_ms
    # Every other point is the profile's (a knee of an earlier round's fit is gone).
    others = [p for p in frontier.points if p.budget_bytes != knee.budget_bytes]
    assert [p for p in out.points if p is not knee] == others


def _fits(monkeypatch, answer):
    """A profile of test_tradeoff's hand-made program, and `knee.profile` answering `answer(program,
    sizes, costs)` with the profile's (costs, (program, sizes, costs), or an exception to raise) in
    place of a stream's calls; returns (profile, its frontier,
    the budgets asked). The stop rules are about which budgets get fitted, so the costs are given."""
    from test_tradeoff import _program

    from layerstream import knee as knee_module
    program, sizes, costs = _program()
    prof = Profile(program, sizes, costs, max_unit=32768, key={})
    asked: list[int] = []

    def fake_profile(spec, weights, budget, device, max_unit, log=None, refresh=False):
        asked.append(budget)
        got = answer(program, sizes, costs)
        if isinstance(got, Exception):
            raise got
        return (*got, max_unit) if isinstance(got, tuple) else (program, sizes, got, max_unit)

    monkeypatch.setattr(knee_module, "profile", fake_profile)
    return prof, sweep(program, sizes, costs, steps=6), asked


def test_a_knee_that_moves_up_is_not_fitted_again(monkeypatch):
    # Fitted there, compute runs 1.2x slower while the disk reads: the knee moves up by more than
    # KNEE_SETTLED (not to the whole model), and its plan reads less than the fitted one: no second fit.
    from dataclasses import replace

    from layerstream.knee import KNEE_SETTLED
    prof, frontier, asked = _fits(monkeypatch, lambda p, s, c: replace(c, read_slowdown=0.2))
    out = calibrate_knee(None, None, prof, frontier, steps=6)
    assert (1 + KNEE_SETTLED) * frontier.knee_bytes < out.knee_bytes < frontier.weight_bytes
    assert asked == [frontier.knee_bytes]
    assert out.knee_point.fitted_at == frontier.knee_bytes and out.profile_knee_bytes == frontier.knee_bytes


def test_a_knee_that_moves_down_is_fitted_again_at_most_once_more(monkeypatch):
    # A disk 16x faster where fitted: the knee moves more than KNEE_SETTLED down, so it is fitted again
    # there; KNEE_ROUNDS fits at most, the last fit's knee kept.
    from dataclasses import replace

    from layerstream.knee import KNEE_SETTLED
    prof, frontier, asked = _fits(monkeypatch, lambda p, s, c: replace(c, read_bps=16 * c.read_bps))
    out = calibrate_knee(None, None, prof, frontier, steps=6)
    assert len(asked) == KNEE_ROUNDS == 2 and asked[0] == frontier.knee_bytes
    assert asked[1] == out.knee_bytes < (1 - KNEE_SETTLED) * asked[0]
    assert out.knee_point.fitted_at == asked[1]


def test_a_stream_that_cannot_fit_at_the_knee_leaves_the_profiles_knee(monkeypatch):
    from layerstream.errors import ModelError
    for answer in (lambda p, s, c: ModelError("the timed calls took another order"),
                   lambda p, s, c: (p, {u: n + 4096 for u, n in s.items()}, c)):  # another cut
        prof, frontier, asked = _fits(monkeypatch, answer)
        said: list[str] = []
        assert calibrate_knee(None, None, prof, frontier, steps=6, log=said.append) == frontier
        assert asked == [frontier.knee_bytes] and "the knee found before stands" in said[-1]
