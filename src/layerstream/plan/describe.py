"""A plan in words: what stays resident, how big the ring is, where compute waits, and how good it is.

Pure text from plain data, so `layerstream plan` prints it and a test can read it without a model.
"""
from __future__ import annotations

from ..budget import fmt_bytes
from ..units import Program
from .cost import CostModel
from .simulate import Prediction
from .types import Plan

MAX_NAMES = 6  # units named per line before "and N more"


def _names(program: Program, uids: list[int]) -> str:
    names = [program.units[u].name for u in uids]
    more = len(names) - MAX_NAMES
    return ", ".join(names[:MAX_NAMES]) + (f" and {more} more" if more > 0 else "")


def describe(program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan, pred: Prediction, *,
             bound_s: float | None = None, status: str | None = None, greedy_s: float | None = None) -> str:
    """Lines a user reads to judge a plan; `bound_s`, `status`, `greedy_s` come from the CP-SAT planner."""
    pinned = [u for u, _ in plan.resident if program.units[u].pinned]
    chosen = [u for u, _ in plan.resident if not program.units[u].pinned]
    streamed = sum(costs.unit_read_bytes(u, sizes[u]) for u, _ in plan.loads)  # bytes read, not slots
    distinct = sorted({u for u, _ in plan.loads})
    lines = [f"plan ({plan.planner}): budget {fmt_bytes(plan.budget_bytes)}, arena {fmt_bytes(plan.arena_bytes)}, "
             f"predicted peak {fmt_bytes(pred.peak_bytes)}"]
    lines.append(f"  resident: {len(chosen)} unit(s), {fmt_bytes(sum(sizes[u] for u in chosen))}"
                 + (f": {_names(program, chosen)}" if chosen else "")
                 + (f" (+ {len(pinned)} pinned, {fmt_bytes(sum(sizes[u] for u in pinned))})" if pinned else ""))
    if plan.loads:
        lines.append(f"  ring: {fmt_bytes(plan.ring_bytes)} for {len(plan.loads)} load(s) per call of "
                     f"{len(distinct)} unit(s), {fmt_bytes(streamed)} read per call: {_names(program, distinct)}")
    else:
        lines.append("  ring: none, nothing is streamed (every unit resident)")
    compute = pred.latency_s - pred.stall_s
    tax = compute - costs.compute_total_s  # compute slowed by the reads beside it (the cost model's read tax)
    lines.append(f"  predicted warm latency {pred.latency_s * 1e3:.2f} ms = compute {costs.compute_total_s * 1e3:.2f} ms"
                 + (f" + read tax {tax * 1e3:.2f} ms" if tax > 1e-12 else "")
                 + f" + stalls {pred.stall_s * 1e3:.2f} ms")
    waits = sorted(((s, i) for i, s in enumerate(pred.stalls_s) if s > 0), reverse=True)
    if waits:
        top = ", ".join(f"{program.units[program.steps[i]].name} +{s * 1e3:.2f} ms" for s, i in waits[:MAX_NAMES])
        lines.append(f"  compute waits for reads at {len(waits)} step(s): {top}"
                     + (f" and {len(waits) - MAX_NAMES} more" if len(waits) > MAX_NAMES else ""))
    if bound_s is not None:
        gap = (pred.latency_s - bound_s) / pred.latency_s if pred.latency_s > 0 else 0.0
        lines.append(f"  CP-SAT {status or ''}: lower bound {bound_s * 1e3:.2f} ms (this plan is within "
                     f"{gap:.1%} of it)" + (f"; greedy {greedy_s * 1e3:.2f} ms" if greedy_s is not None else ""))
        lines.append("    (the bound holds for every resident set and ring under this budget, in the solver's "
                     "model of a warm call; that model lets loads sit anywhere in the ring, so no plan may reach it)")
    return "\n".join(lines)
