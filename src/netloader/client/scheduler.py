"""Striping, as pure bookkeeping (no sockets, no threads, no locks: the caller holds one):
which source pulls which chunks, in batches sized by each source's measured speed, so that
fast sources take more and all finish at about the same time; a failed source's
undelivered chunks go back to the queue for the others.

Life of a pull, for the caller:

    scheduler = Scheduler(sources)
    source = scheduler.next_source()          # per worker; None: nobody left to try
    scheduler.load(manifest.chunks())         # once, when the first manifest is adopted
    while batch := scheduler.take(source):    # fetch it, then report how it went:
        scheduler.done(source, batch, seconds)     # or
        scheduler.failed(source, batch, undelivered, reason)  # and stop using source
                                                   # (retry=True: it dropped the connection)
    scheduler.leave(source)                   # nothing to take now
    scheduler.rejoin(source)                  # if work came back (has_work) while waiting
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence

from netloader.endpoint import Endpoint
from netloader.manifest import Chunk

# A source's first batch, before its speed is known, and later batches' length in seconds
# at its measured speed: short enough to rebalance, long enough that a request's round
# trip is noise.
FIRST_BATCH_BYTES = 8 << 20
BATCH_SECONDS = 0.25
# A source that dropped the connection (a reset, a server that gave up on a slow client)
# is tried this many more times, once no other source is left, before the pull fails.
RETRIES = 1


class Scheduler:
    def __init__(
        self,
        sources: Sequence[Endpoint],
        *,
        first_batch_bytes: int = FIRST_BATCH_BYTES,
        batch_seconds: float = BATCH_SECONDS,
    ) -> None:
        self.first_batch_bytes = first_batch_bytes
        self.batch_seconds = batch_seconds
        self.untried = deque(sources)
        self.again: deque[Endpoint] = deque()  # dropped a connection: may be tried again
        self.tries: dict[Endpoint, int] = {}  # how often each source was handed out
        self.dropped: set[Endpoint] = set()  # failed at least once
        self.active: set[Endpoint] = set()  # sources a worker is on (connecting or fetching)
        self.pending: deque[Chunk] = deque()  # chunks nobody is fetching
        self.pending_bytes = 0
        self.in_flight = 0  # batches handed out and not yet done or failed
        self.loaded = False
        self.rates: dict[Endpoint, float] = {}  # bytes per second, smoothed
        self.delivered: dict[str, int] = {}  # bytes per source, in order of first delivery
        self.failures: list[str] = []

    @property
    def finished(self) -> bool:
        """Every chunk was handed out and came back done."""
        return self.loaded and not self.pending and self.in_flight == 0

    @property
    def has_work(self) -> bool:
        return bool(self.pending)

    def next_source(self) -> Endpoint | None:
        """The next untried source (now active); once every source failed, one that only
        dropped its connection, again (see RETRIES); None when finished or none is left."""
        if self.finished:
            return None
        if self.untried:
            source = self.untried.popleft()
        elif self.again and self.dropped >= set(self.tries):
            source = self.again.popleft()
        else:
            return None
        self.active.add(source)
        self.tries[source] = self.tries.get(source, 0) + 1
        return source

    def load(self, chunks: Iterable[Chunk]) -> None:
        """The chunks to pull, in the order to pull them (once)."""
        assert not self.loaded
        self.pending.extend(chunks)
        self.pending_bytes = sum(c.length for c in self.pending)
        self.loaded = True

    def take(self, source: Endpoint) -> list[Chunk]:
        """The next batch for `source`; empty when nothing is waiting to be fetched."""
        if not self.pending:
            return []
        budget = self._budget(source)
        batch: list[Chunk] = []
        size = 0
        while self.pending and (not batch or size < budget):
            chunk = self.pending.popleft()
            batch.append(chunk)
            size += chunk.length
        self.pending_bytes -= size
        self.in_flight += 1
        return batch

    def _budget(self, source: Endpoint) -> float:
        if len(self.active) <= 1:
            return self.pending_bytes  # alone: everything in one request, no round trips
        known = [self.rates[s] for s in self.active if s in self.rates]
        rate = self.rates.get(source)
        if rate is None:
            return min(self.first_batch_bytes, self.pending_bytes / len(self.active))
        total = sum(known) + (len(self.active) - len(known)) * (sum(known) / len(known))
        share = self.pending_bytes * rate / total  # finish together with the others
        return min(share, rate * self.batch_seconds)

    def done(self, source: Endpoint, batch: Sequence[Chunk], seconds: float) -> None:
        """`source` delivered all of `batch` in `seconds`."""
        size = sum(c.length for c in batch)
        rate = size / max(seconds, 1e-6)
        self.in_flight -= 1
        old = self.rates.get(source)
        self.rates[source] = rate if old is None else (old + rate) / 2
        self.delivered[str(source)] = self.delivered.get(str(source), 0) + size

    def failed(
        self,
        source: Endpoint,
        batch: Sequence[Chunk],
        undelivered: Sequence[Chunk],
        reason: str,
        *,
        retry: bool = False,
    ) -> None:
        """`source` is out; `undelivered` (the part of its `batch`, possibly empty, that
        did not arrive verified) goes back to the front of the queue. `retry`: it only
        dropped the connection, so it may be tried again (see next_source)."""
        self.active.discard(source)
        self.dropped.add(source)
        if retry and self.tries.get(source, 0) <= RETRIES:
            self.again.append(source)
        if batch:
            self.in_flight -= 1
            arrived = sum(c.length for c in batch) - sum(c.length for c in undelivered)
            if arrived:
                self.delivered[str(source)] = self.delivered.get(str(source), 0) + arrived
            self.pending.extendleft(reversed(undelivered))
            self.pending_bytes += sum(c.length for c in undelivered)
        self.failures.append(reason if str(source) in reason else f"{source}: {reason}")

    def leave(self, source: Endpoint) -> None:
        """`source` has nothing to take for now (it may `rejoin` if work comes back)."""
        self.active.discard(source)

    def rejoin(self, source: Endpoint) -> None:
        self.active.add(source)
