"""The knee found again with costs fitted to a real stream's calls at it (knee.py)."""
from __future__ import annotations

import json

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
    knee = next(p for p in out.points if p.budget_bytes == out.knee_bytes)
    assert knee.fitted_at is not None and knee.predicted_ms <= KNEE * out.knee_compute_ms
    # The costs the knee was found with are the stream's, learned by its calls at `fitted_at` and kept in
    # its cache: swept with them, the knee is the same point.
    entries = [Profile.from_json(p.read_text()) for p in cache_root().glob("Sequential-*.json")]
    fitted = [e for e in entries if e.key.get("budget") == knee.fitted_at]
    assert len(fitted) == 1
    again = sweep(prof.program, prof.sizes, fitted[0].costs, steps=6)
    assert again.knee_bytes == knee.budget_bytes
    assert json.dumps(next(p for p in again.points if p.budget_bytes == again.knee_bytes).predicted_ms) == \
        json.dumps(knee.predicted_ms)
    # Every other point is the profile's (a knee of an earlier round's fit is gone).
    others = [p for p in frontier.points if p.budget_bytes != knee.budget_bytes]
    assert [p for p in out.points if p is not knee] == others
