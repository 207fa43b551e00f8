"""Sending comes second to the host's own work (inference): the server's threads run at a
lower scheduling priority, and all of a server's transfers together can be held to a byte
rate. Both are set in `Limits` (`sender_nice`, `send_rate`)."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

log = logging.getLogger(__name__)


def lower_this_thread(niceness: int) -> None:
    """Give the calling thread, and the threads it starts from now on, the scheduling
    niceness `niceness` (Linux keeps one per thread; 0 leaves it as it is). Raising it
    needs no privilege; it never lowers a niceness the thread already has."""
    if niceness <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(current, min(niceness, 19)))
    except OSError as exc:
        log.debug("netloader: cannot lower the server threads' priority: %s", exc)


BURST_SECONDS = 0.1  # a capped server may send this long's worth of bytes at once


class Pacer:
    """A token bucket shared by every transfer of one server: `take(n)` returns once `n`
    more bytes may go without exceeding `rate` bytes per second on average (after a pause,
    BURST_SECONDS' worth at once). With `rate` None it never waits."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.burst = 0.0 if rate is None else rate * BURST_SECONDS
        self._next = -math.inf  # when what was taken has drained at `rate`
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> None:
        if self.rate is None or nbytes <= 0:
            return
        with self._lock:
            now = time.monotonic()
            # An idle bucket refills to `burst`, not beyond.
            start = max(self._next, now - self.burst / self.rate)
            self._next = start + nbytes / self.rate
            wait = self._next - now
        if wait > 0:
            time.sleep(wait)
