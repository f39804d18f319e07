"""Plan files (`layerstream plan --json`): a Plan plus what a runtime needs to rebuild the cut it names.

A plan names units of the cut its profile ran: units of at most `max_unit` bytes, merged along the
order the profiled call took (`root_order`, what capture.fuse takes). Both travel with the plan.
"""
from __future__ import annotations

import json

from .plan import Plan
from .plan.types import PlanError
from .units import Program


def write_plan_file(path, plan: Plan, program: Program, max_unit: int, **extra) -> None:
    """Write `plan` with the unit size and recorded order of `program`, and `extra` fields for people."""
    d = json.loads(plan.to_json())
    d.update(max_unit=max_unit, root_order=program.root_order, **extra)
    with open(path, "w") as f:
        json.dump(d, f, indent=1)


def read_plan_file(path, max_unit: int | None) -> tuple[Plan, int | None, list[str] | None]:
    """(plan, unit size, root order) from a plan file; the file's unit size wins (its units need it)."""
    with open(path) as f:
        text = f.read()
    d = json.loads(text)
    if max_unit is not None and d.get("max_unit") not in (None, max_unit):
        raise PlanError(f"{path} plans units of at most {d['max_unit']} bytes; drop max_unit={max_unit} "
                        "or plan again with that unit size")
    return Plan.from_json(text), d.get("max_unit") or max_unit, d.get("root_order")
