"""Several models, one budget: one arena, one shared ring, one call at a time, the next model read ahead.

```python
with layerstream.Session(budget="256MB", workload=["detector", "classifier", "lm"]) as s:
    s.add("detector", detector, "detector.safetensors")
    s.add("classifier", classifier, "classifier.safetensors")
    s.add("lm", lm, "lm.safetensors")
    boxes = s.run("detector", image)        # from any thread: calls are served one at a time, FIFO
    print(s.report())                       # per model and total: latency, reads, misses, out of order
```

One I/O backend serves every model (one AIO context or one thread pool, one queue depth): each model
reads its own files through a `Port` of it, so the next model's prefetch queues behind the current
model's reads, in issue order, instead of competing with them from a second queue.

The arena is `[model 1 resident | ... | model N resident | shared ring]` (plan/workload.py decides the
split), allocated once at the session's budget, so no order of calls can exceed it. Compute on one
device is serial, so calls take turns in arrival order (`Turns`), and the ring needs to serve only the
model that runs, plus the model expected next: once the running model has issued its last load, the
next model's first loads go into ring bytes it has released (cross-model prefetch), and more follow
as it releases more. The next model is the next caller already waiting if there is one, else the one
the declared workload (or, without one, the calls seen) says comes next. A call out of that order
first takes the wrong guess's loads back (after their reads land: they write into the ring), is
counted, and runs as any call does: correctness never depends on a prediction.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch

from .budget import parse_bytes
from .errors import BudgetError, ClosedError
from .plan.simulate import simulate
from .plan.workload import ModelDemand, Predictor, WorkloadPlan, plan_workload
from .runtime.arena import Arena
from .runtime.executor import Executor
from .runtime.io import DEFAULT_WORKERS, IOBackend, make_shared_io
from .runtime.turns import Turns
from .session_report import ModelReport, SessionReport
from .stream import StreamedModel

LEARNED_REPLAN_EVERY = 16  # without a declared workload, re-plan after 16, 32, 64, ... calls


class SessionModel(StreamedModel):
    """A StreamedModel whose arena, ring and plan are the session's.

    Learning runs as in StreamedModel (order, timed call, serial call, costs), but where it would
    re-plan the model alone it asks the session, which re-plans the whole workload.
    """

    def __init__(self, session: Session, name: str, model, path, **kwargs):
        self._session, self.session_name = session, name
        self._placed = False  # False until the session has planned the workload with this model in it
        self._kept_stats = None  # counters carried from one executor to the next across re-plans
        super().__init__(model, path, session.budget_bytes, session.device, **kwargs)

    def forward(self, *args, **kwargs):
        """A call goes through the session (its turn, its prefetch, its counts), as `session.run` does."""
        return self._session.run(self.session_name, *args, **kwargs)

    def _open_io(self, io: str, workers: int):
        return self._session._port(self._reader, self.trace)

    def close(self) -> None:
        """Close this model alone. Its reads share the session's backend, so this waits for the session's
        turn (unless this thread holds it: the session closing, or add() failing)."""
        turns = self._session._turns
        if turns.held():
            return super().close()
        with turns.turn():
            super().close()

    def generate(self, *args, **kwargs):
        """The inner model's `generate()`, served by the session as `session.generate` does."""
        return self._session.generate(self.session_name, *args, **kwargs)

    def _start(self, plan) -> None:
        self.plan = plan
        if not self._placed:
            return
        s = self._session
        self._arena, self._stage = s.arena, s.stage
        ex = Executor(self.cap, self.layouts, plan, s.arena, self._io, self.trace, s.stage,
                      getattr(self, "checks", None),  # (packed files' checksums, where StreamedModel has them)
                      getattr(self, "split_digests", None))
        if self._kept_stats is not None:
            ex.stats = self._kept_stats
        ex.call_only = True
        ex.others = lambda: s._others(self)
        ex.on_ring_full = lambda: s._ring_full(self)
        ex.after_release = lambda: s._tail(self)
        ex.set_serial(self._learning == "pure")  # the serial timing call survives a re-plan
        self._exec = ex

    def _stop(self) -> None:
        if self._exec is not None:
            self._kept_stats = self._exec.stats
            self._exec.close()  # waits for its reads, gives its bytes back to the shared arena
            self._exec = None
        self._arena = self._stage = None  # the session's: it closes them

    def _restart(self, cap, make_plan) -> None:
        if cap is not self.cap:  # a fused unit cut; the plan made alone is not used in a session
            self._session._adopt(self, cap)

    def _maybe_replan(self, ex, *args) -> None:
        had = self.costs
        super()._maybe_replan(ex, *args)
        if had is None and self.costs is not None:
            self._session._replan()


class Session:
    """Several streamed models under one budget; see the module docstring.

    `workload` declares what to expect: a list of model names (a cycle, or run once with
    `cycle=False`), or a dict of relative call frequencies. Without it the session learns the order
    and the frequencies from the calls it serves, and re-plans as they settle.
    """

    def __init__(self, budget, device="cpu", workload: Sequence[str] | dict[str, float] | None = None, *,
                 cycle: bool = True, reader: str = "auto", io: str = "auto", workers: int = DEFAULT_WORKERS,
                 trace: bool = False):
        if isinstance(budget, str) and budget.strip().endswith("%"):
            raise BudgetError(f"session budget {budget!r}: a session holds several models, so give bytes "
                              "('512MB', '1.5GiB'), not a share of one model's weights")
        self.budget_bytes = parse_bytes(budget)
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device!r}: layerstream streams to 'cpu' or 'cuda' devices")
        if isinstance(workload, dict):
            self.predictor = Predictor(frequency={str(k): float(v) for k, v in workload.items()})
        else:
            self.predictor = Predictor(tuple(workload or ()), cycle)
        self._defaults = dict(reader=reader, trace=trace)
        self._io_args = (io, workers)
        self.io: IOBackend | None = None  # every model's reads; made at the first add, from its file's mode
        self._models: dict[str, SessionModel] = {}
        self._turns = Turns()
        self.arena = Arena(self.budget_bytes, self.budget_bytes, self.device)
        self.stage = None  # CUDA: one pinned staging ring, so copies into the shared ring see every model's frees
        self.plan: WorkloadPlan | None = None
        self._prefetched: SessionModel | None = None  # the model whose loads are in the ring ahead of its call
        self._expected: str | None = None  # the model expected when the last call ended
        self._calls = 0
        self.counts = {k: Counter() for k in ("out_of_order", "prefetched", "prefetched_bytes", "failed",
                                              "arena_peak_bytes")}
        self._closed = False
        self._generating = False  # a generate() holds the turn: its steps are not followed by another model

    # ---- the public surface ---------------------------------------------------------------------
    def add(self, name: str, model, path, max_unit: int | None = None, **kwargs) -> SessionModel:
        """Register `model` (built on meta) streamed from `path`; the workload is re-planned with it."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"model name {name!r}: give a non-empty string")
        if {"io", "workers"} & kwargs.keys():
            raise ValueError("io and workers belong to the session (one backend reads for every model): "
                             "give them to layerstream.Session(...), not to add()")
        with self._turns.turn():
            self._check_open()
            if name in self._models:
                raise ValueError(f"a model named {name!r} is already in this session; pick another name")
            sm = SessionModel(self, name, model, path, max_unit=max_unit, **{**self._defaults, **kwargs})
            self._models[name] = sm
            try:
                self._replan()
            except BaseException:
                del self._models[name]
                sm.close()
                if self._models:
                    self._replan()  # the others may have moved: put them back where they were
                raise
            return sm

    def run(self, name: str, *args, **kwargs):
        """Run model `name` on the arguments; waits for its turn; returns its output to this caller."""
        return self._serve(name, StreamedModel.forward, args, kwargs)

    def generate(self, name: str, *args, **kwargs):
        """Model `name`'s `generate()` (transformers) in one turn: prefill and every decoding step are
        streamed calls of that model, one after another, while other callers wait. Each step is a call
        in the model's figures (`session.report()`, and `report().generation` of the model); the
        workload's predictor sees one call."""
        return self._serve(name, StreamedModel.generate, args, kwargs, generating=True)

    def _serve(self, name: str, fn, args, kwargs, generating: bool = False):
        """`fn(model, *args, **kwargs)` for model `name`, in its turn, with the session's counts around it.
        `generating`: the calls are generate()'s steps, one after another, so no other model is read
        ahead between them (only after the last, as after any call)."""
        sm = self._models.get(name)
        if sm is None:
            self._check_open()
            raise KeyError(f"no model named {name!r} in this session; added: {', '.join(self._models) or 'none'}")
        with self._turns.turn(name):
            self._check_open()
            self._before(sm)
            peak0, self.arena.peak_bytes = self.arena.peak_bytes, self.arena.live_bytes  # this call's own peak
            self._generating = generating
            try:
                return fn(sm, *args, **kwargs)
            except BaseException:
                self.counts["failed"][name] += 1
                raise
            finally:
                self._generating = False
                peak = self.counts["arena_peak_bytes"]
                peak[name] = max(peak[name], self.arena.peak_bytes)
                self.arena.peak_bytes = max(peak0, self.arena.peak_bytes)
                self._after(sm)

    @property
    def models(self) -> list[str]:
        return list(self._models)

    def report(self) -> SessionReport:
        with self._turns.turn():
            self._check_open()
            rows = [ModelReport.of(n, m, {k: c[n] for k, c in self.counts.items()}) for n, m in self._models.items()]
            return SessionReport.of(self, rows)

    def close(self) -> None:
        """Wait for the call in flight, then stop every model's reads, close their files, free the arena."""
        with self._turns.turn():
            if self._closed:
                return
            self._closed = True
            errors = []
            try:
                for sm in self._models.values():
                    try:  # each model closes even if one fails: the shared backend closes after all of them
                        sm.close()
                    except Exception as e:
                        errors.append(e)
            finally:
                if self.stage is not None:
                    self.stage.close()
                    self.stage = None
                if self.io is not None:
                    self.io.close()
                    self.io = None
                self.arena.close()
            if errors:
                raise errors[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _port(self, reader, trace):
        """A model's door to the session's one I/O backend (chosen, at the first model, as stream() would)."""
        if self.io is None:
            self.io = make_shared_io(reader.mode, *self._io_args)
        return self.io.port(reader, trace)

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this session is closed; make a new layerstream.Session")

    # ---- around each call (holding the turn) ----------------------------------------------------
    def _before(self, sm: SessionModel) -> None:
        """Take back a wrong guess's prefetches, count the call, note what was read ahead for it."""
        name = sm.session_name
        if sm._io is None:
            raise ClosedError(f"model {name!r} of this session was closed; add it again under another name")
        if sm._exec is None:  # a re-plan could not start it (a read failed): try again now
            self._apply(self.plan)
        if self._expected is not None and self._expected != name:
            self.counts["out_of_order"][name] += 1
        self.predictor.observe(name)
        p = self._prefetched
        if p is not None and p is not sm and p._exec is not None:
            p._exec.drop_prefetched()
        self._prefetched = None
        ex = sm._exec
        if ex.inflight:
            sm._io.progress()  # notice reads that landed (kernel AIO completes only when reaped)
            self.counts["prefetched"][name] += 1
            self.counts["prefetched_bytes"][name] += sum(ld.nbytes for ld in ex.inflight.values() if ld.done.is_set())

    def _after(self, sm: SessionModel) -> None:
        """Free the ring of this model's leftovers, then read ahead for the model expected next."""
        if sm._exec is not None:
            sm._exec.drop_prefetched()  # loads past a failed or data-dependent call: the ring is the next model's
        self._calls += 1
        if not self.predictor.declared and self._calls >= LEARNED_REPLAN_EVERY \
                and self._calls & (self._calls - 1) == 0:
            self._replan()  # frequencies learned so far: 16, 32, 64, ... calls
        self._expected = self._next()
        if self._expected is not None:
            self._prefetch(self._models[self._expected])

    def _next(self) -> str | None:
        waiting = self._turns.next_waiting()
        return waiting if waiting in self._models else self.predictor.expect()

    def _prefetch(self, nxt: SessionModel) -> None:
        if nxt._exec is None:
            return
        p = self._prefetched
        if p is not None and p is not nxt and p._exec is not None:
            p._exec.drop_prefetched()  # a waiting caller changed what comes next
        self._prefetched = nxt
        nxt._exec.prefetch()
        nxt._io.poll()

    # ---- the executors' view of the shared ring (compute thread, holding the turn) --------------
    def _others(self, sm: SessionModel) -> list:
        return [ld for m in self._models.values() if m is not sm and m._exec is not None for ld in m._exec.live]

    def _ring_full(self, sm: SessionModel) -> bool:
        """A demand miss found no room: the next model's prefetches give the ring back."""
        p = self._prefetched
        if p is None or p is sm or p._exec is None or not p._exec.inflight:
            return False
        p._exec.drop_prefetched()
        return True

    def _tail(self, sm: SessionModel) -> None:
        """After a release in `sm`'s call: once it has issued its last load, read the next model ahead."""
        ex = sm._exec
        if ex is None or ex.serial or not ex.issued_all or self._generating:
            return  # (a serial call times pure compute: nothing may read beside it)
        nxt = self._next()
        if nxt is not None and nxt != sm.session_name:
            self._prefetch(self._models[nxt])

    # ---- planning ---------------------------------------------------------------------------------
    def _demands(self) -> list[ModelDemand]:
        weights = self.predictor.weights(list(self._models))
        return [ModelDemand(n, m.cap.program, m.sizes, weights[n], m.costs) for n, m in self._models.items()]

    def _replan(self) -> None:
        self._apply(plan_workload(self._demands(), self.budget_bytes))

    def _adopt(self, sm: SessionModel, cap) -> None:
        """Learning fused `sm`'s units: re-plan with the new cut, or keep the old one if it would not fit."""
        old = sm.cap
        sm._set_capture(cap)
        try:
            plan = plan_workload(self._demands(), self.budget_bytes)
        except BudgetError:
            sm._set_capture(old)
            return
        sm._stop()
        self._apply(plan)

    def _apply(self, wplan: WorkloadPlan) -> None:
        """Restart the models whose placement changed (all stopped first: regions may swap)."""
        demands = self._demands()
        plans = wplan.plans(demands)
        changed = [m for n, m in self._models.items() if m._exec is None or m.plan != plans[n]]
        host = 0
        if self.device.type == "cuda":  # the staging ring takes the shared ring and the largest resident read
            host = max([wplan.ring_bytes, 4096] + [m.sizes[u] for n, m in self._models.items()
                                                   for u, _ in plans[n].resident])
            if self.stage is None or self.stage.host.nbytes < host:
                changed = list(self._models.values())  # every executor holds the stage it started with
        for m in changed:
            if m is self._prefetched:
                self._prefetched = None
            if m._exec is not None and m._learning == "pure":
                m._learning = "overlapped"  # its timed call ran another plan: time it again
            m._stop()
        if host and (self.stage is None or self.stage.host.nbytes < host):
            from .runtime.device import CudaStage
            if self.stage is not None:
                self.stage.close()
            self.stage = CudaStage(self.device, host)
        self.plan = wplan
        for m in changed:
            m._placed = True
            m._start(plans[m.session_name])
        by_name = {d.name: d for d in demands}
        for n, m in self._models.items():
            if m.costs is not None:
                m.prediction = simulate(by_name[n].program, m.sizes, m.costs, plans[n])
