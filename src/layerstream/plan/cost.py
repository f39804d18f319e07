"""The cost model: how long each step computes and how fast the file reads (pure data).

Compute times come from a real call: the executor records when each root's pre-forward hook started
and when its weights were ready (a linear's row blocks, acquired inside its forward, by their own
acquires). A step's compute is the time from its weights being ready to the next step starting, so
waits for reads are never counted as compute. Read cost is latency plus bytes over bandwidth, with
the disk alone, measured on the same file with the same reader. Compute and the disk slow each other
while both run (`read_slowdown`, `disk_slowdown`), and a step's compute finds at most
`inflight_bytes` in flight per top-up of kernel AIO's queue (`refills`): the simulator (simulate.py)
plays these out, calibrate.py fits them.

A unit's read is not always its slot: an int8 unit's slot holds the expanded float weights while the
disk gives about a quarter of that, and a gather unit's planned load reads nothing ahead (its slot is
scratch for the rows its forward reads on demand, resident or not, so they are timed as that step's
compute). Memory is charged in slot bytes (the planners' `sizes`); read time and the bytes "streamed"
per call are charged in the bytes read, which `read_bytes` lists where they differ.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from functools import cached_property

from ..units import Program

MAX_SLOWDOWN = 20.0  # compute 21x slower while reading: beyond it, a measured tax is noise, not a host


@dataclass(frozen=True)
class CostModel:
    compute_s: tuple[float, ...]  # per step of the program: compute after its weights are ready
    pre_s: float  # compute in a call before its first step
    read_bps: float  # bytes per second of the reader on this file
    read_lat_s: float = 1e-4  # fixed cost per load
    # Compute runs (1 + read_slowdown) times slower while the disk is reading. On the 2-vCPU development
    # VM the host steals ~30% of each vCPU while its virtual disk reads (benchmarks/io_tax.py: compute
    # 1.6-1.7x slower at every chunk size and read speed), so the tax is a slowdown per second of disk
    # activity: compute that overlaps no read pays nothing, whatever the call reads in all.
    read_slowdown: float = 0.0
    # The disk reads (1 + disk_slowdown) times slower while compute runs: the reader's thread and the
    # host's I/O share the vCPUs with torch's threads (seen on the development VM: 1.0-1.6 GB/s with
    # compute waiting, 0.5-0.66 GB/s beside it).
    disk_slowdown: float = 0.0
    # Bytes the disk can read during one step's compute (0: no limit) per time the compute thread tops
    # up kernel AIO's queue during it (reads are submitted and reaped on the compute thread only).
    inflight_bytes: int = 0
    # (unit id, bytes one load of it reads), sorted, for units whose read is not their slot: int8 units
    # and gather units (UnitLayout.read_nbytes: their extents; none for a gather unit). Others: the slot.
    read_bytes: tuple[tuple[int, int], ...] = ()
    # Per step, the times the queue is topped up during its compute when it does not stream: one per
    # module root it runs (each root's pre-hook; measured from a call). A streamed step tops it up once
    # more, when its unit is released (the release issues the next loads). Empty: once per step.
    refills: tuple[int, ...] = ()

    def read_s(self, nbytes: int) -> float:
        return self.read_lat_s + nbytes / self.read_bps

    @cached_property
    def _read_of(self) -> dict[int, int]:  # read_bytes as a dict (cached: planners ask per load)
        return dict(self.read_bytes)

    def unit_read_bytes(self, uid: int, slot_nbytes: int) -> int:
        """Bytes one load of unit `uid` reads from the file: its slot's `slot_nbytes` unless listed."""
        return self._read_of.get(uid, slot_nbytes)

    def read_sizes(self, sizes: Mapping[int, int]) -> dict[int, int]:
        """Unit id -> bytes one load reads, for every unit of `sizes` (unit id -> slot bytes)."""
        return {u: self._read_of.get(u, s) for u, s in sizes.items()}

    def refills_of(self, step: int, streamed: bool) -> int:
        """How many times kernel AIO's queue is topped up during step `step`'s compute."""
        return (self.refills[step] if self.refills else 1) + streamed

    @property
    def compute_total_s(self) -> float:
        return self.pre_s + sum(self.compute_s)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "CostModel":
        d = json.loads(text)
        slowdown = d.get("read_slowdown")
        if slowdown is None:  # saved before the tax was a slowdown: it was a cost per byte read
            k = d.get("read_tax_s_per_byte", 0.0) * d["read_bps"]  # the share of compute lost while reading
            slowdown = min(MAX_SLOWDOWN, k / (1.0 - k)) if k < 1.0 else MAX_SLOWDOWN
        return cls(tuple(d["compute_s"]), d["pre_s"], d["read_bps"], d["read_lat_s"], slowdown,
                   d.get("disk_slowdown", 0.0), d.get("inflight_bytes", 0),
                   tuple((int(u), int(n)) for u, n in d.get("read_bytes", ())),  # (absent before read bytes were)
                   tuple(int(r) for r in d.get("refills", ())))


def least_compute(costs: CostModel, other: CostModel) -> CostModel:
    """`costs` with each step's compute (and the pre-step compute) the lesser of its and `other`'s: two
    calls of one program, each step timed in both. A step's compute is longer than it need be after a
    wait (every loaded step of a serial call waits, and the threads that slept wake slowly), beside a
    read (the read tax) or in a slow moment of the host; the least seen is the nearest to its own."""
    if len(costs.compute_s) != len(other.compute_s):
        raise ValueError(f"{len(costs.compute_s)} steps against {len(other.compute_s)}: not one program's calls")
    return replace(costs, compute_s=tuple(map(min, costs.compute_s, other.compute_s)),
                   pre_s=min(costs.pre_s, other.pre_s))


def with_read_bytes(costs: CostModel, sizes: Mapping[int, int], read_nbytes: Mapping[int, int]) -> CostModel:
    """`costs` charging unit u's loads `read_nbytes[u]` bytes of reading (its slot `sizes[u]` still in memory).

    Entries equal to the slot are dropped (that is the default), so a model whose every unit reads its
    slot keeps `read_bytes == ()` and plans exactly as before. Replaces any read bytes `costs` had.
    """
    for u, n in read_nbytes.items():
        if n < 0 or u not in sizes:
            raise ValueError(f"read bytes {n} for unit {u}: give a unit of `sizes` and a count of bytes >= 0")
    return replace(costs, read_bytes=tuple(sorted((u, int(n)) for u, n in read_nbytes.items() if n != sizes[u])))


def costs_from_record(program: Program, root_units: dict[str, list[int]],
                      record: list[tuple[str, int, int]], t_start_ns: int, t_end_ns: int,
                      read_bps: float, unit_waits: list[tuple[int, int, int]] = ()) -> CostModel | None:
    """Per-step compute times of one recorded call of `program`, or None if the call took another order.

    `record` holds (root path, pre-hook start ns, weights-ready ns) for each root forward, in order.
    `unit_waits` holds (unit id, start ns, ready ns) for units acquired inside a forward (a linear's row
    blocks), in order: such a step starts and has its weights when its own acquire did, so the wait for
    its read is not counted as the previous block's compute.
    """
    waits: dict[int, list[tuple[int, int]]] = {}
    for uid, t0, t1 in reversed(unit_waits):  # reversed: pop() takes them in order
        waits.setdefault(uid, []).append((t0, t1))
    opens: list[tuple[int, int, int]] = []  # (unit id, start ns, ready ns), one per step
    roots: list[int] = []  # per step, the root forwards that begin during it (each pre-hook tops up kernel AIO)
    for path, t0, t1 in record:
        before = len(opens)
        for uid in root_units.get(path, ()):
            if not opens or opens[-1][0] != uid:
                own = waits.get(uid)
                opens.append((uid, *own.pop()) if own else (uid, t0, t1))
                roots.append(0)
        if roots:
            roots[before if len(opens) > before else -1] += 1
    if tuple(u for u, _, _ in opens) != program.steps:
        return None
    ends = [t0 for _, t0, _ in opens[1:]] + [t_end_ns]
    compute = tuple(max(0, end - ready) / 1e9 for (_, _, ready), end in zip(opens, ends))
    pre = (opens[0][1] - t_start_ns) / 1e9 if opens else (t_end_ns - t_start_ns) / 1e9
    return CostModel(compute, max(0.0, pre), read_bps, refills=tuple(max(1, r) for r in roots))
