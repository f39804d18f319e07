"""Measure a model's cost model on this machine: stream it for two calls and keep what they showed."""
from __future__ import annotations

import os

from .errors import BudgetError, ModelError
from .meta import build_empty
from .stream import stream


def profile(spec, weights: str | os.PathLike, budget="25%", device="cpu", max_unit: int | None = None):
    """(program, slot sizes, calibrated CostModel, max_unit) of `spec` streamed from `weights`.

    The first call learns the order, the next two are timed step by step (see StreamedModel).
    """
    inputs = tuple(x.to(device) for x in spec.example_inputs())
    try:
        sm = stream(build_empty(spec.build), weights, budget=budget, device=device, max_unit=max_unit)
    except BudgetError as e:  # below the minimum for this cut: profile at the minimum instead
        sm = stream(build_empty(spec.build), weights, budget=e.minimum_bytes, device=device, max_unit=max_unit)
    with sm:
        for _ in range(3):
            sm(*inputs)
        if sm.costs is None:
            raise ModelError("the timed calls took another order than the first (data-dependent control "
                             "flow), or nothing streams at this budget, so no cost model could be made")
        return sm.cap.program, dict(sm.sizes), sm.costs, sm.max_unit
