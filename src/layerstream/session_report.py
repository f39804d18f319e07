"""What a Session cost, per model and in total: the figures `Session.report()` and the CLI print."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .budget import fmt_bytes

if TYPE_CHECKING:
    from .session import Session, SessionModel

LEARNING_CALLS = 3  # a model's first calls learn its order and costs; "warm" figures leave them out


@dataclass
class ModelReport:
    name: str
    calls: int  # that returned an output
    failed: int  # that raised
    latency_ms: float  # the last call
    warm_ms: float  # mean over the calls after the learning ones (all calls while there are no others)
    latency_ms_all: list[float]
    weight_bytes: int
    resident_bytes: int  # its region of the arena
    arena_peak_bytes: int  # the arena's live bytes at most during its calls (every model's residents included)
    bytes_read: int  # all calls, resident loads included
    demand_misses: int
    out_of_order: int  # calls other than the one the session expected next
    prefetched: int  # calls that began with loads the session had read ahead for them
    prefetched_bytes: int  # of those loads, the bytes that had landed when their call began
    loads_per_call: int
    predicted_ms: float | None  # the simulator's warm latency for its plan, once its costs are known
    reader: str

    @classmethod
    def of(cls, name: str, sm: SessionModel, counts: dict[str, int]) -> ModelReport:
        lat = list(sm._latencies)
        warm = lat[LEARNING_CALLS:] or lat
        ex = sm._exec
        stats = ex.stats if ex is not None else sm._kept_stats
        return cls(
            name=name, calls=len(lat), failed=counts["failed"], latency_ms=lat[-1] if lat else 0.0,
            warm_ms=sum(warm) / len(warm) if warm else 0.0, latency_ms_all=lat, weight_bytes=sm.weight_bytes,
            resident_bytes=sum(sm.sizes[u] for u, _ in sm.plan.resident), arena_peak_bytes=counts["arena_peak_bytes"],
            bytes_read=stats.bytes_read if stats else 0, demand_misses=stats.demand_misses if stats else 0,
            out_of_order=counts["out_of_order"], prefetched=counts["prefetched"],
            prefetched_bytes=counts["prefetched_bytes"], loads_per_call=len(sm.plan.loads),
            predicted_ms=sm.prediction.latency_s * 1e3 if sm.prediction else None,
            reader=f"{sm._reader.mode}/{sm._io.kind}")


@dataclass
class SessionReport:
    models: list[ModelReport]
    budget_bytes: int
    arena_bytes: int  # allocated once, = budget
    arena_peak_bytes: int  # the arena's own accounting of live bytes, all models together
    ring_bytes: int  # shared by every model
    resident_bytes: int  # all models' regions
    planner: str  # "bytes" until every model has learned its costs, then "cost"
    workload: str  # what the session expects: the declared sequence, or "learned"
    calls: int = 0
    failed: int = 0
    total_ms: float = 0.0  # the latencies of every call, summed
    bytes_read: int = 0
    demand_misses: int = 0
    out_of_order: int = 0
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, s: Session, rows: list[ModelReport]) -> SessionReport:
        p = s.predictor
        workload = (" -> ".join(p.sequence) + (" (cycle)" if p.cycle else "") if p.sequence
                    else f"frequencies {p.frequency}" if p.frequency else "learned from the calls")
        r = cls(rows, s.budget_bytes, s.arena.nbytes, s.arena.peak_bytes, s.plan.ring_bytes if s.plan else 0,
                sum(m.resident_bytes for m in rows), s.plan.planner if s.plan else "-", workload)
        r.calls = sum(m.calls for m in rows)
        r.failed = sum(m.failed for m in rows)
        r.total_ms = sum(sum(m.latency_ms_all) for m in rows)
        r.bytes_read = sum(m.bytes_read for m in rows)
        r.demand_misses = sum(m.demand_misses for m in rows)
        r.out_of_order = sum(m.out_of_order for m in rows)
        if any(m.reader == "buffered/threads" for m in rows):
            r.notes.append("a filesystem refused O_DIRECT: buffered reads, pages dropped after each read")
        if any(m.reader == "buffered/aio" for m in rows):
            r.notes.append("a file read buffered through the session's kernel AIO (chosen by the first model's "
                           "file): its reads complete inside io_submit and its pages stay cached")
        return r

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = ("| model | calls | warm ms | last ms | predicted ms | weights | resident | arena peak | read | misses "
                "| out of order | read ahead |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
        rows = [f"| {m.name} | {m.calls}" + (f" ({m.failed} failed)" if m.failed else "")
                + f" | {m.warm_ms:.1f} | {m.latency_ms:.1f} | "
                + (f"{m.predicted_ms:.1f}" if m.predicted_ms is not None else "-")
                + f" | {fmt_bytes(m.weight_bytes)} | {fmt_bytes(m.resident_bytes)} | {fmt_bytes(m.arena_peak_bytes)} "
                f"| {fmt_bytes(m.bytes_read)} "
                f"| {m.demand_misses} | {m.out_of_order} | {m.prefetched} calls, {fmt_bytes(m.prefetched_bytes)} |"
                for m in self.models]
        total = (f"| total | {self.calls}" + (f" ({self.failed} failed)" if self.failed else "")
                 + f" | | {self.total_ms:.1f} (sum) | | {fmt_bytes(sum(m.weight_bytes for m in self.models))} "
                 f"| {fmt_bytes(self.resident_bytes)} | {fmt_bytes(self.arena_peak_bytes)} | {fmt_bytes(self.bytes_read)} "
                 f"| {self.demand_misses} "
                 f"| {self.out_of_order} | |")
        lines = [head, *rows, total, "",
                 f"budget {fmt_bytes(self.budget_bytes)}: arena peak {fmt_bytes(self.arena_peak_bytes)}, "
                 f"{fmt_bytes(self.resident_bytes)} resident + {fmt_bytes(self.ring_bytes)} shared ring "
                 f"(plan: {self.planner}); workload: {self.workload}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])
