"""Pure planning: Program + slot sizes + budget -> Plan. No threads, no files, no devices."""
from .types import Plan, min_budget, place_ring
from .fill import plan_fill

__all__ = ["Plan", "min_budget", "place_ring", "plan_fill"]
