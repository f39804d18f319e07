"""Turns: callers of a Session run one at a time, first come first served."""
from __future__ import annotations

import contextlib
import threading
from collections import deque


class Turns:
    """Callers run one at a time, in the order they arrived (a ticket queue).

    A plain Lock is not fair: a thread calling in a loop can take it again before a waiting thread
    wakes, and starve it. The queue also tells the session which model runs next, for certain.
    """

    def __init__(self):
        self._cv = threading.Condition()
        self._queue: deque[tuple[object, str | None]] = deque()  # (ticket, model name); head holds the turn
        self._holder: int | None = None  # the thread holding the turn

    @contextlib.contextmanager
    def turn(self, name: str | None = None):
        ticket = (object(), name)
        with self._cv:
            if self._holder == threading.get_ident():
                raise RuntimeError("a session call from inside a session call (e.g. a model's forward calling "
                                   "session.run) would wait for itself; call the inner model directly instead")
            self._queue.append(ticket)
            try:
                self._cv.wait_for(lambda: self._queue[0] is ticket)
            except BaseException:  # interrupted while waiting: leave the queue, wake whoever is next
                self._queue.remove(ticket)
                self._cv.notify_all()
                raise
            self._holder = threading.get_ident()
        try:
            yield
        finally:
            with self._cv:
                self._holder = None
                self._queue.popleft()
                self._cv.notify_all()

    def held(self) -> bool:
        """Whether the calling thread holds the turn."""
        with self._cv:
            return self._holder == threading.get_ident()

    def next_waiting(self) -> str | None:
        """The model of the first caller waiting behind the current turn, if any."""
        with self._cv:
            return self._queue[1][1] if len(self._queue) > 1 else None
