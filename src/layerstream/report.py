"""What a streamed model reports: per-call latency, memory, reads, stalls (and generate()'s figures)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from .budget import fmt_bytes

if TYPE_CHECKING:
    from .pretrained import GenerationStats


@dataclass
class Report:
    """What streaming cost: per-call latency, memory, reads and stalls."""

    calls: int
    latency_ms: float  # the last call
    latency_ms_all: list[float]
    weight_bytes: int  # the whole model, what preloading would hold
    budget_bytes: int
    arena_bytes: int  # allocated once, <= budget
    arena_peak_bytes: int  # the arena's own accounting of live bytes
    resident_bytes: int
    ring_bytes: int
    bytes_read: int  # all calls, resident loads included
    bytes_read_last_call: int
    stall_ms: float  # compute waiting for reads, last call
    demand_misses: int  # all calls
    units: int
    loads_per_call: int
    reader: str  # "direct/aio", "direct/threads" or "buffered/threads" (the filesystem refused O_DIRECT)
    planner: str  # "fill" until a call has been timed, then "greedy" if its simulation was faster
    predicted_ms: float | None  # the simulator's warm latency for the plan in use (after the second call)
    read_bps: float | None  # the reader's speed on this file, measured for the cost model
    notes: list[str] = field(default_factory=list)
    generation: GenerationStats | None = None  # the last generate(): tokens/s, its bound, KV cache bytes

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rows = [
            ("calls", f"{self.calls}"),
            ("latency (last call)", f"{self.latency_ms:.1f} ms"),
            ("weights", fmt_bytes(self.weight_bytes)),
            ("budget", fmt_bytes(self.budget_bytes)),
            ("arena (peak used)", f"{fmt_bytes(self.arena_bytes)} ({fmt_bytes(self.arena_peak_bytes)})"),
            ("resident / ring", f"{fmt_bytes(self.resident_bytes)} / {fmt_bytes(self.ring_bytes)}"),
            ("read (last call / all)", f"{fmt_bytes(self.bytes_read_last_call)} / {fmt_bytes(self.bytes_read)}"),
            ("stall (last call)", f"{self.stall_ms:.1f} ms"),
            ("demand misses", f"{self.demand_misses}"),
            ("units / loads per call", f"{self.units} / {self.loads_per_call}"),
            ("reader", self.reader),
            ("plan (predicted)", f"{self.planner}" + (f" ({self.predicted_ms:.1f} ms at "
                                 f"{self.read_bps / 1e9:.2f} GB/s)" if self.predicted_ms else "")),
        ]
        if self.generation is not None:
            rows += self.generation.rows()
        w = max(len(k) for k, _ in rows)
        return "\n".join([f"{k:<{w}}  {v}" for k, v in rows] + [f"note: {n}" for n in self.notes])
