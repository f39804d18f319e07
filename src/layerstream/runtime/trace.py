"""Timestamped events of every read, compute step and wait, exportable as Chrome-trace JSON (Perfetto).

Appending to a deque is atomic under the GIL, so reader threads and the compute thread record without
a lock; the cost per event is a tuple and a clock read. The deque is bounded, so a model serving calls
for hours keeps only its most recent events instead of growing without end.
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque

MAX_EVENTS = 200_000  # about 20 MB of tuples at most; enough for many calls of a large model


class Trace:
    def __init__(self, enabled: bool = True, max_events: int = MAX_EVENTS):
        self.enabled = enabled
        self.t0_ns = time.perf_counter_ns()
        self.events: deque[tuple[str, str, int, int, str]] = deque(maxlen=max_events)  # (name, cat, start, end, lane)

    @staticmethod
    def now() -> int:
        return time.perf_counter_ns()

    def add(self, name: str, cat: str, start_ns: int, end_ns: int, lane: str | None = None) -> None:
        if self.enabled:
            self.events.append((name, cat, start_ns, end_ns, lane or threading.current_thread().name))

    def to_chrome(self) -> dict:
        """Chrome trace format: one complete ("X") event per span, one lane (tid) per thread."""
        lanes: dict[str, int] = {}
        out = []
        for name, cat, s, e, lane in self.events:
            tid = lanes.setdefault(lane, len(lanes))
            out.append({"name": name, "cat": cat, "ph": "X", "pid": 0, "tid": tid,
                        "ts": (s - self.t0_ns) / 1e3, "dur": max(e - s, 0) / 1e3})
        meta = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": n}} for n, t in lanes.items()]
        return {"traceEvents": meta + out, "displayTimeUnit": "ms"}

    def save_chrome(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_chrome(), f)
