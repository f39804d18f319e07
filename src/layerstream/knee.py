"""The knee found again with a cost model fitted where it is: streamed calls at the knee's budget.

How much compute slows while the disk reads (the read tax) depends on the regime the calls run in, so
a profile fitted to warm calls at its budget (25% by default: ViT-B/16's calls there wait on the disk)
mispredicts budgets whose reads hide under compute. On ViT-B/16 the tax per byte read came out
0.13-0.19 ms/MB fitted at 19-27% and 0.26-0.35 at 37-73% (the 09:07 run's points, each fitted to its own
warm calls), so the knee the profile's costs found read more per call than it could hide: predicted
1.047x compute, measured 1.11x eager. Demand Layering found its knee by trial runs over buffer sizes;
here the model finds it, a stream at that budget learns its costs there (its own first calls: order,
timed and serial calls, warm refits; profile.py), and the knee is found again with them.

Only a knee that moved down (by more than KNEE_SETTLED of the budget) is fitted again: its plan reads
more per call, so the tax is fitted on more. One that moved up reads less, and the tax fitted there is a
difference within the host's noise: in a 10:51 run the costs fitted at 219.5 MiB (a plan reading 129 MiB
a call) put the knee at 285.8 MiB, and a fit there (a plan reading some 50 MiB a call) came out at 1.41 ms
of compute lost per MB read where every other fit from 37% up said 0.24-0.42, which put the knee at
the whole model.
"""
from __future__ import annotations

from .budget import fmt_bytes
from .errors import BudgetError, ModelError
from .plan.tradeoff import Frontier, sweep, with_knee
from .profile import Profile, profile

KNEE_ROUNDS = 2  # budgets calibrated at, at most
KNEE_SETTLED = 0.1  # a knee found less than this share below the budget calibrated at is not fitted again


def calibrate_knee(spec, weights, prof: Profile, frontier: Frontier, device="cpu", steps: int = 12,
                   refresh: bool = False, log=None) -> Frontier:
    """`frontier` (swept with `prof`'s costs) with its knee found again by costs fitted to streamed
    calls at the knee, again if that knee is lower (see the module docstring). No knee, or a knee where
    nothing streams: as it is. A stream there that cannot learn costs (or cuts the model otherwise)
    leaves the knee found before."""
    log = log or (lambda msg: None)
    fitted_at: list[int] = []
    found = frontier
    while len(fitted_at) < KNEE_ROUNDS:
        knee = found.knee_bytes
        if knee is None or knee >= frontier.weight_bytes:
            break
        if fitted_at and knee >= fitted_at[-1] * (1 - KNEE_SETTLED):  # (it reads no more than the fit's plan)
            break
        log(f"fitting the cost model to calls at the knee, {fmt_bytes(knee)} ...")
        try:
            program, sizes, costs, _ = profile(spec, weights, knee, device, prof.max_unit, log=log, refresh=refresh)
        except (BudgetError, ModelError) as e:  # e.g. calls whose order varies: no costs to fit there
            log(f"  no cost model at the knee ({str(e).splitlines()[0]}): the knee found before stands")
            break
        if program != prof.program or sizes != prof.sizes:  # another cut: its costs do not plan this program
            log("  the stream there cut the model otherwise: the knee found before stands")
            break
        fitted_at.append(knee)
        found = with_knee(frontier, sweep(program, sizes, costs, steps), knee)  # (the last fit's knee only)
    return found
