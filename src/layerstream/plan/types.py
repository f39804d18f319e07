"""The Plan value and the arithmetic every planner shares: ring placement and the minimum budget."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from ..budget import fmt_bytes
from ..errors import BudgetError, LayerstreamError


class PlanError(LayerstreamError, ValueError):
    """A plan that does not fit the program it is given to (another file, another unit cut)."""
from ..units import Program


@dataclass(frozen=True)
class Plan:
    """Which units stay resident and where every streamed load lands; the runtime only carries it out.

    The arena is `[resident region | ring]`. Streamed loads follow `loads` in order, cyclically (the
    next call's first loads follow this call's last), each at a fixed ring offset, so a load may start
    as soon as the loads that last occupied its bytes are released: no allocator runs while streaming
    and memory can never fragment or exceed `arena_bytes <= budget_bytes`.
    """

    budget_bytes: int
    resident: tuple[tuple[int, int], ...]  # (unit id, offset in the arena)
    ring_offset: int  # the ring starts here (= resident bytes)
    ring_bytes: int
    loads: tuple[tuple[int, int], ...]  # (unit id, offset in the ring), in execution order
    planner: str = "fill"

    @property
    def arena_bytes(self) -> int:
        return self.ring_offset + self.ring_bytes

    @property
    def resident_ids(self) -> frozenset[int]:
        return frozenset(u for u, _ in self.resident)

    def validate(self, sizes: dict[int, int]) -> None:
        """Raise PlanError unless every resident unit and every load lies inside the arena, apart."""
        spans = sorted((off, off + sizes[u], u) for u, off in self.resident)
        for (a0, a1, u), (b0, _, v) in zip(spans, spans[1:]):
            if b0 < a1:
                raise PlanError(f"plan places resident units {u} and {v} over each other")
        if spans and spans[-1][1] > self.ring_offset:
            raise PlanError(f"resident unit {spans[-1][2]} ends at {spans[-1][1]}, past the ring at {self.ring_offset}")
        for u, off in self.loads:
            if off < 0 or off + sizes[u] > self.ring_bytes:
                raise PlanError(f"plan puts unit {u} ({sizes[u]} bytes) at ring offset {off}, past the "
                                f"{self.ring_bytes}-byte ring; the plan was made for another file or unit cut")
        if self.arena_bytes > self.budget_bytes:
            raise PlanError(f"plan's arena of {self.arena_bytes} bytes exceeds its budget of {self.budget_bytes}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        return cls(d["budget_bytes"], tuple(map(tuple, d["resident"])), d["ring_offset"], d["ring_bytes"],
                   tuple(map(tuple, d["loads"])), d.get("planner", "fill"))

    def summary(self, program: Program, sizes: dict[int, int]) -> str:
        streamed = sum(sizes[u] for u, _ in self.loads)
        return (f"plan ({self.planner}): budget {fmt_bytes(self.budget_bytes)}, arena {fmt_bytes(self.arena_bytes)} = "
                f"{len(self.resident)} resident unit(s) {fmt_bytes(self.ring_offset)} + ring {fmt_bytes(self.ring_bytes)}; "
                f"{len(self.loads)} load(s) per call, {fmt_bytes(streamed)} streamed per call")


def place_ring(sizes: list[int], ring_bytes: int) -> list[int]:
    """Offsets for loads placed one after another in a ring, wrapping to 0 when one does not fit the end."""
    offsets, head = [], 0
    for s in sizes:
        if s > ring_bytes:
            raise BudgetError(f"a {fmt_bytes(s)} load does not fit a {fmt_bytes(ring_bytes)} ring")
        if head + s > ring_bytes:
            head = 0
        offsets.append(head)
        head += s
    return offsets


def make_plan(budget: int, resident: list[int], loads: list[int], sizes: dict[int, int], ring: int,
              planner: str) -> Plan:
    """Resident units end to end from offset 0, the ring after them, every load placed in the ring."""
    offsets, off = [], 0
    for u in resident:
        offsets.append((u, off))
        off += sizes[u]
    return Plan(budget, tuple(offsets), off, ring, tuple(zip(loads, place_ring([sizes[u] for u in loads], ring))),
                planner)


def min_budget(program: Program, sizes: dict[int, int]) -> tuple[int, int | None]:
    """The smallest budget that runs `program`: pinned units plus the largest streamed unit.

    Returns (bytes, id of the streamed unit that sets it, or None when nothing streams).
    """
    pinned = sum(sizes[u.uid] for u in program.units if u.pinned)
    streamed = {u for u in program.steps if not program.units[u].pinned}
    if not streamed:
        return pinned, None
    big = max(streamed, key=lambda u: sizes[u])
    return pinned + sizes[big], big


def check_budget(program: Program, sizes: dict[int, int], budget: int) -> None:
    """Raise BudgetError naming the minimum and the unit that sets it when `budget` is below it."""
    need, big = min_budget(program, sizes)
    if budget >= need:
        return
    pinned = need - (sizes[big] if big is not None else 0)
    why = (f"unit {big} ({program.units[big].name}, {fmt_bytes(sizes[big])}) must fit the ring"
           if big is not None else "the pinned units must be resident")
    raise BudgetError(
        f"budget {fmt_bytes(budget)} is below the minimum {fmt_bytes(need)} ({need} bytes) for this model: "
        f"{why}, beside {fmt_bytes(pinned)} of pinned units; raise the budget to at least {need} bytes, "
        "or pass a smaller max_unit so large modules are split further", minimum_bytes=need)
