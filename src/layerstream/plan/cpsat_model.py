"""The CP-SAT model of one warm call that the exact planner (cpsat.py) solves, and the bound it proves.

The model (OR-Tools CP-SAT; times in integer quanta of the call's serial worst case / RESOLUTION):
  - a Boolean per unit the call uses: resident or streamed (pinned units are always resident);
  - per step, a compute of its pure length, one after another, the call's period T after the last;
    T, and every window between two step starts, at least what compute and the disk slowing each
    other imply (bounds every schedule meets: see the comments below; linear in the Booleans);
  - per streamed step, an optional read interval (present iff its unit streams), as long as reading
    (with the disk alone) the bytes its load reads (`CostModel.read_bytes`: less than the slot for
    int8 and gather units), that ends before its compute starts and starts no earlier than a period
    before that (the runtime reads at most one call ahead); reads share one no-overlap channel (the
    disk serves one read at a time), in step order, the next call's first read after this call's last;
  - per streamed step, an optional memory interval of its slot bytes from its read's start to its
    compute's end, and per resident unit one over the whole horizon, under a cumulative constraint:
    the arena's bytes in use never exceed the budget, and the resident bytes leave room for the
    largest slot that streams (`_add_largest_slot`);
  - in the bound model only (`for_bound`), the disk's work followed from step start to step start
    (cpsat_flow.py): per step, what it reads beside the compute (slowing it, at most
    `read_allowance`) and while compute waits, every load in before its step, what was read ahead
    within the ring and, as each compute ends, of whole loads begun in order;
  - every read and memory interval also shifted by T, so the next call's loads that start during
    this call's tail (as they do in steady state) count against this call's disk time and memory;
  - objective: minimise T, the period of the steady state of repeated calls (a warm call's latency).

What its lower bound means. Every periodic schedule the runtime could follow with a resident set and
a ring is a solution of this model, so the model's optimum is a lower bound on the warm latency of
*any* plan under the budget, as the simulator predicts it in steady state. It is a relaxation: it
allows any placement of loaded bytes (the ring's fixed offsets may not fit a schedule the cumulative
allows), and reads may start before their ring bytes are freed in FIFO order. Durations are
rounded down to whole quanta and shortened by one (so that rounding can never make a real schedule
infeasible here), so the bound is low by at most a quantum per step, and by about one more per
streamed step for the read tax (each unit's tax is rounded down to whole quanta) and two or three
per step for the disk's work (cpsat_flow.py). The disk's work is followed as a fluid, loads are
issued at any moment rather than at step boundaries, and a load read in part holds its whole slot
only as each compute ends, so a plan whose ring is nearly full can run slower in the simulator than
here: that, too, is a gap between the plan and the bound. The bound is CP-SAT's proven bound on
the model's optimum, so when the solver stops at its time limit it is weaker still (on the zoo's
programs its LP-guided branching raises it at most ~1.4% above its linear relaxation's in 10 s),
and it says nothing about the disk or the device being slower than the cost model says. The
simulator reports the third of three back-to-back calls, which a plan with a slow start may not
have settled by; the bound is for the settled state.

OR-Tools is never imported here: the planner passes its `cp_model` module in.
"""
from __future__ import annotations

import math

from ..units import Program
from .cost import CostModel
from .cpsat_flow import add_flow
from .simulate import timeline
from .types import Plan

# Time quanta per greedy's predicted latency, per step. The search (for plans) is quicker on coarse
# quanta and without the disk's work followed step by step; the bound is tighter on fine quanta with
# it, where the few quanta each step's cuts give up to rounding add up to a few hundredths of a
# percent (at 100 a step they cost ResNet-50's bound 1.7-3%). The planner solves one model of each.
SEARCH_QUANTA_PER_STEP = 100
BOUND_QUANTA_PER_STEP = 10_000
RESOLUTION_MIN, RESOLUTION_MAX = 1_000, 1_000_000
WINDOW_STEPS = 40  # up to this many steps, a window cut for every pair of steps (beyond: presolve outgrows them)
WINDOW_SPAN = 24  # beyond, a window cut for every pair at most this many steps apart


class CpsatModel:
    """The CP-SAT variables of one call of `program` under `budget` (see the module docstring)."""

    def __init__(self, cp_model, program: Program, sizes: dict[int, int], costs: CostModel, budget: int,
                 upper_s: float, for_bound: bool = False):
        m = self.m = cp_model.CpModel()
        steps = program.steps
        pinned = {u.uid for u in program.units if u.pinned}
        self.units = sorted({u for u in steps if u not in pinned})
        cap = budget - sum(sizes[u] for u in pinned)
        per_step = BOUND_QUANTA_PER_STEP if for_bound else SEARCH_QUANTA_PER_STEP
        resolution = max(RESOLUTION_MIN, min(RESOLUTION_MAX, per_step * len(steps)))
        self.q = q = max(upper_s, 1e-9) / resolution  # seconds per quantum
        H = self.H = 2 * resolution + 2  # the optimum is below the greedy plan's `upper_s`, with room to spare

        def quanta(seconds: float) -> int:  # rounded down
            return int(seconds / q)

        def shortened(seconds: float) -> int:  # and one less, where shifted copies meet: see the module doc
            return max(0, int(seconds / q) - 1)

        self.T = m.new_int_var(0, H, "T")
        self.res = {u: m.new_bool_var(f"res{u}") for u in self.units}
        # The read tax: compute and the disk slow each other while both run (`CostModel.read_slowdown` x,
        # `disk_slowdown` y). In a period T, with C the pure compute, R the reads' time alone and O the
        # time both run: compute lasts W = C + k O and the disk D = R + k' O (k = x / (1 + x),
        # k' = y / (1 + y)), and O >= W + D - T. With T >= W this gives T >= C + min(1, k / (1 - k')) R,
        # and with T >= D, T >= R + min(1, k' / (1 - k)) C (where k + k' >= 1, T >= C + R), linear in
        # the residency Booleans (the first with read latency left out, `per_read` its coefficient per
        # byte). Which step a read slows is not modelled, so steps keep their pure lengths: any per-step
        # tax could forbid a real schedule whose reads avoid that step.
        # Reads are timed and taxed by the bytes a load reads; memory is held in slot bytes (`sizes`).
        kx, ky = (s / (1.0 + s) for s in (costs.read_slowdown, costs.disk_slowdown))
        per_read = min(1.0, kx / (1.0 - ky)) / costs.read_bps if costs.read_bps > 0 else 0.0
        self.read = read = {u: costs.unit_read_bytes(u, sizes[u]) for u in self.units}
        tax = {u: quanta(per_read * read[u]) for u in self.units}
        taxq = sum(tax[u] * (1 - self.res[u]) for u in steps if u in self.res)  # the R term, rounded down
        total = costs.compute_total_s
        self.dur = [quanta(c) for c in costs.compute_s]
        self.held_dur = [shortened(c) for c in costs.compute_s]  # a load's bytes are held until its compute ends
        self.c = [m.new_int_var(0, H, f"c{i}") for i in range(len(steps))]
        if steps:
            m.add(self.c[0] >= quanta(costs.pre_s))
            for i in range(1, len(steps)):
                m.add(self.c[i] >= self.c[i - 1] + self.dur[i - 1])
            m.add(self.T >= self.c[-1] + self.dur[-1])
        m.add(self.T >= quanta(total) + taxq)  # all compute and the whole tax
        self.r: dict[int, object] = {}  # step -> read start (this call's frame; negative: the previous call)
        self.rd: dict[int, int] = {}
        reads, memory, demands = [], [], []
        for u in self.units:  # resident units hold their bytes over the whole horizon
            memory.append(m.new_optional_fixed_size_interval_var(-H, 3 * H + 1, self.res[u], f"R{u}"))
            demands.append(sizes[u])
        streamed_steps = self.streamed_steps = [i for i, u in enumerate(steps) if u in self.res]
        for i in streamed_steps:
            u = steps[i]
            on = self.res[u].Not()
            rd = self.rd[i] = shortened(costs.read_s(read[u]))
            r = self.r[i] = m.new_int_var(-H, H, f"r{i}")
            r2 = m.new_int_var(-H, 2 * H, f"r{i}+T")  # the next call's read of this step
            m.add(r2 == r + self.T)
            m.add(r + rd <= self.c[i]).only_enforce_if(on)
            m.add(r >= self.c[i] - self.T - 1).only_enforce_if(on)  # at most one call ahead
            reads += [m.new_optional_fixed_size_interval_var(r, rd, on, f"L{i}"),
                      m.new_optional_fixed_size_interval_var(r2, rd, on, f"L{i}+T")]
            held = m.new_int_var(0, 2 * H, f"held{i}")  # bytes held from the read's start to the compute's end
            e2 = m.new_int_var(-H, 4 * H, f"e{i}+T")
            end = self.c[i] + self.held_dur[i]
            memory += [m.new_optional_interval_var(r, held, end, on, f"M{i}"),
                       m.new_optional_interval_var(r2, held, e2, on, f"M{i}+T")]
            demands += [sizes[u], sizes[u]]
        m.add_no_overlap(reads)
        # The disk's side of the read tax above: T >= R + min(1, k' / (1 - k)) C.
        self.per_compute = per_compute = min(1.0, ky / (1.0 - kx))
        if per_compute > 0 and streamed_steps:
            m.add(self.T >= sum(self.rd[i] * self.res[steps[i]].Not() for i in streamed_steps)
                  + quanta(per_compute * total))
        if memory:
            m.add_cumulative(memory, demands, cap)
        # Reads in step order (the runtime issues loads in order and the disk serves them FIFO): f[k]
        # is at least the end of every read up to streamed step k; the next call's reads follow f[-1].
        self.f = [m.new_int_var(-H, H, f"f{k}") for k in range(len(streamed_steps))]
        if streamed_steps:
            f0 = m.new_int_var(-H, H, "f_prev_call")
            m.add(f0 + self.T >= self.f[-1])
            prev = f0
            for k, i in enumerate(streamed_steps):
                on = self.res[steps[i]].Not()
                m.add(self.f[k] >= prev)
                m.add(self.f[k] >= self.r[i] + self.rd[i]).only_enforce_if(on)
                m.add(self.r[i] >= prev).only_enforce_if(on)
                prev = self.f[k]
        resident_bytes = self.resident_bytes = m.new_int_var(0, sum(sizes[u] for u in self.units), "resident_bytes")
        m.add(resident_bytes == sum(sizes[u] * self.res[u] for u in self.units))
        self._add_largest_slot(sizes, cap)
        ring_terms = self._ring_terms(program, sizes, costs, cap)
        self._add_windows(program, costs, quanta, ring_terms)
        if for_bound:
            add_flow(self, program, sizes, costs, cap, quanta, ring_terms)
        # Redundant, for the bound: the disk reads every streamed step within one period, and what it
        # cannot read during the computes (`read_allowance` each, the pre's included) while compute
        # waits.
        period_reads = sum(quanta(costs.read_s(read[steps[i]])) * (1 - self.res[steps[i]]) for i in streamed_steps)
        m.add(self.T >= period_reads)
        allow = self.read_allowance(costs)
        if streamed_steps and any(a < d for a, d in zip(allow, self.dur)):
            pre = self.read_allowance(costs, (costs.pre_s,))[0]
            m.add(self.T >= sum(self.dur) + quanta(costs.pre_s) + period_reads - sum(allow) - pre)
        m.minimize(self.T)

    def _add_largest_slot(self, sizes: dict[int, int], cap: int) -> None:
        """Redundant: the ring holds every streamed slot beside the resident units (one at a time at least).

        In a form whose linear relaxation is tighter than a cut per unit. Per slot size s (largest
        first), `over[s]`: some unit of size s or more streams (true when those units together exceed
        the budget less the pinned units). The largest streamed slot is then the sum of (s - the next
        size below) over the sizes it reaches. A cut per unit would let a unit half resident need
        half its slot; this one charges the ring the whole slot of the largest size that streams at
        all, once the budget forces a unit of that size or more to stream.
        """
        m = self.m
        levels = sorted({sizes[u] for u in self.units}, reverse=True)
        over, prev, larger = [], None, 0
        for s in levels:
            o = m.new_bool_var(f"streams_over{s}")
            same = [u for u in self.units if sizes[u] == s]
            for u in same:
                m.add(o >= 1 - self.res[u])
            if prev is not None:
                m.add(o >= prev)
            larger += s * len(same)
            if larger > cap:
                m.add(o == 1)
            over.append(o)
            prev = o
        if over:
            m.add(self.resident_bytes + sum((s - t) * o for s, t, o in zip(levels, levels[1:] + [0], over)) <= cap)

    def read_allowance(self, costs: CostModel, compute_s=None) -> list[int]:
        """Per step, in quanta (rounded up): the most the disk can read, as long alone, during its compute.

        A compute of c s lasts at most c (1 + x) (slowed throughout), and the disk reads beside it at
        1 / (1 + y) of its speed, and no more than the reads in flight each time the queue is topped up
        during it (`CostModel.refills_of`, as if the step streams wherever it may). `compute_s`: other
        computes (the pre's), topped up once."""
        x, y = costs.read_slowdown, costs.disk_slowdown
        flight = costs.inflight_bytes / costs.read_bps if costs.inflight_bytes else math.inf
        if compute_s is None:
            may_stream = set(self.streamed_steps)
            compute_s = costs.compute_s
            refills = [costs.refills_of(i, i in may_stream) for i in range(len(compute_s))]
        else:
            refills = [1] * len(compute_s)
        return [math.ceil(min(flight * n, c * (1 + x) / (1 + y)) / self.q) for c, n in zip(compute_s, refills)]

    def _ring_terms(self, program: Program, sizes: dict[int, int], costs: CostModel, cap: int):
        """What the ring holds ahead, in read quanta: (per unit `w`, resident `held`, `ring`, `lat`) or None.

        A load reads at most `ratio` times its slot (the most any unit reads per slot byte: 1 when
        every unit reads its slot, about 1/4 when all are int8), so the reads of the loads held at
        once take at most `ratio` times their slots' bytes over the read speed (plus a read latency
        each). w[u]: unit u's slot so scaled, rounded down (as `held`, the resident units' sum: a
        smaller right side); `ring`: the whole budget's, rounded up; `lat`: the read latencies of as
        many loads as the ring could hold at once (the smallest slots of two calls' steps), rounded up.
        None when a unit reads with no slot: no ratio bounds its reads, so no cut on what the ring
        holds is sure to hold (one that reads nothing costs a latency per load, which `lat` counts).
        """
        if not self.streamed_steps or any(self.read[u] and not sizes[u] for u in self.units):
            return None
        ratio = max((self.read[u] / sizes[u] for u in self.units if sizes[u]), default=1.0)
        if ratio != 1.0:
            ratio *= 1 + 1e-9  # so that float rounding never puts a unit's read above ratio x its slot
        w = {u: int(ratio * sizes[u] / (costs.read_bps * self.q)) for u in self.units}
        held = self.m.new_int_var(0, sum(w.values()), "resident_read_quanta")
        self.m.add(held == sum(w[u] * self.res[u] for u in self.units))
        loads, room = 0, cap
        for size in sorted(2 * [sizes[u] for u in program.steps if u in self.res]):
            if size > room:
                break
            loads, room = loads + 1, room - size
        ring = math.ceil(ratio * cap / (costs.read_bps * self.q))
        return w, held, ring, math.ceil(costs.read_lat_s * loads / self.q)

    def own_slot(self, per_unit: dict[int, int], steps: tuple[int, ...], step: int):
        """Step `step`'s slot, as `per_unit` counts it (bytes, read quanta), if it streams; 0 for the pre (-1)."""
        if step < 0 or steps[step] not in self.res:
            return 0
        return per_unit[steps[step]] * (1 - self.res[steps[step]])

    def _add_windows(self, program: Program, costs: CostModel, quanta, ring_terms) -> None:
        """Redundant cuts that make the bound strong early: reads between two computes, less what fit the ring.

        Between the starts of steps a and b the disk reads every streamed load of steps a+1..b but those
        whose read began before step a started; those were all held at that moment beside step a's own
        load, so their slot bytes fit the ring (the budget less the resident slots less step a's), and
        the time they saved is at most their reads' time (`_ring_terms`) plus one read latency each.
        Terms are rounded so that every real schedule still satisfies the integer cut.
        """
        m, steps, q = self.m, program.steps, self.q
        if ring_terms is None:
            return
        w, held, ring, _ = ring_terms
        full = {i: quanta(costs.read_s(self.read[steps[i]])) for i in self.streamed_steps}
        span = len(steps) if len(steps) <= WINDOW_STEPS else WINDOW_SPAN
        # Within a window, its computes and the reads it needs slow each other as in a period (the read
        # tax's comment in __init__): it lasts at least those reads plus the disk's share of those
        # computes. And the disk reads little during a compute: at most `inflight_bytes` (CostModel) per
        # top-up, at its slowed rate, for at most the compute's slowed length (`read_allowance`). The reads the
        # window needs beyond that happen while compute waits: the window is also at least its steps'
        # computes plus what they leave unread.
        allow = self.read_allowance(costs)
        tighter = any(a < d for a, d in zip(allow, self.dur))  # else the cut is the one above
        for a in range(len(steps)):
            mine = self.own_slot(w, steps, a)
            reads, n = [], 0
            computes, allowed = self.dur[a], allow[a]  # steps a..b-1
            for b in range(a + 1, min(len(steps), a + 1 + span)):
                if steps[b] in self.res:
                    reads.append(full[b] * (1 - self.res[steps[b]]))
                    n += 1
                    lat = math.ceil(costs.read_lat_s * n / q)
                    m.add(self.c[b] - self.c[a] + 1 >= sum(reads) - lat - ring + held + mine)
                    if self.per_compute > 0:  # the period's cut T >= R + min(1, k'/(1-k)) C, over the window
                        m.add(self.c[b] - self.c[a] + 1 >= sum(reads) - lat - ring + held + mine
                              + int(self.per_compute * computes))
                    if tighter:
                        m.add(self.c[b] - self.c[a] + 1 >= sum(reads) - lat - ring + held + mine + computes
                              - allowed)
                computes += self.dur[b]
                allowed += allow[b]

    def hint(self, program: Program, sizes: dict[int, int], costs: CostModel, plan: Plan) -> None:
        """Start the search from `plan`'s simulated schedule (its last call)."""
        tl = timeline(program, sizes, costs, plan)
        m, q, t0 = self.m, self.q, tl.call_start_s
        resident = plan.resident_ids
        for u, v in self.res.items():
            m.add_hint(v, u in resident)
        for i, c in enumerate(self.c):
            m.add_hint(c, int((tl.compute_start_s[i] - t0) / q))
        m.add_hint(self.T, int(tl.latency_s / q))
        prev_end = None
        for k, i in enumerate(self.streamed_steps):
            j = tl.load_of_step[i]
            if j >= 0:
                r = int((tl.read_start_s[j] - t0) / q)
                m.add_hint(self.r[i], r)
                prev_end = max(prev_end or r, r + self.rd[i])
            if prev_end is not None:
                m.add_hint(self.f[k], prev_end)

    def peak_load_bytes(self, value, sizes: dict[int, int], steps: tuple[int, ...]) -> int:
        """The most bytes of loads a solution holds at once (its ring need), over one period.

        `value` reads a variable of the solution (a solver's or a solution callback's `value`).
        """
        T = value(self.T)
        events = []
        for i in self.streamed_steps:
            if value(self.res[steps[i]]):
                continue
            s, e = value(self.r[i]), value(self.c[i]) + _value(value, self.held_dur[i])
            for shift in (0, T):
                events += [(s + shift, sizes[steps[i]]), (e + shift, -sizes[steps[i]])]
        live = peak = 0
        for _, d in sorted(events, key=lambda x: (x[0], x[1])):
            live += d
            peak = max(peak, live)
        return peak

    def solution(self, value, sizes: dict[int, int], steps: tuple[int, ...]) -> tuple[frozenset[int], int]:
        """(resident set, ring need) of a solution."""
        resident = frozenset(u for u in self.units if value(self.res[u]))
        return resident, self.peak_load_bytes(value, sizes, steps)


def _value(value, x) -> int:
    """A solution's value of `x`, a variable or a constant."""
    return x if isinstance(x, int) else value(x)
