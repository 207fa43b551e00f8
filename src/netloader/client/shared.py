"""The state one pull's workers share: the scheduler, the adopted manifest and the sink,
under one lock; workers wait on it for work that comes back from a failed source."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol

import torch

from netloader import metrics
from netloader.client.scheduler import Scheduler
from netloader.client.sink import VerifyingSink
from netloader.endpoint import Endpoint
from netloader.errors import ManifestMismatch, PeerClosed, SourceUnavailable, TransferError
from netloader.manifest import Chunk, Manifest
from netloader.protocol import Part


class PullObserver(Protocol):
    """Follows a pull as it goes (a relay, serving each chunk on once it is verified)."""

    def begin(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None: ...

    def arrived(self, chunk: Chunk) -> None: ...

    def fail(self, reason: str) -> None: ...


class SharedPull:
    """The state one `load_into`'s workers share: the scheduler, the adopted manifest and
    the sink, under one lock; workers wait on it for work that comes back."""

    def __init__(
        self,
        expected: Manifest,
        dest: Mapping[str, torch.Tensor],
        sources: Sequence[Endpoint],
        progress: Callable[[int], None] | None,
        observer: PullObserver | None,
        huge_pages: bool,
        reference: Manifest | None = None,
        part: Part = Part.WEIGHTS,
        chunks: Collection[int] | None = None,
    ) -> None:
        self.expected = expected
        self.part = part
        self.chunks = chunks  # a subset of the chunks to fetch (None: all of dest's)
        self.dest = dest
        self.progress = progress
        self.observer = observer
        self.huge_pages = huge_pages
        self.plan = Scheduler(sources)
        self.transports: set[str] = set()  # the ones bytes actually came over
        self.changed = threading.Condition()
        self.reference = reference  # the bytes every source must hold (the first one's)
        self.sink: VerifyingSink | None = None
        self.last_error: TransferError | None = None

    def next_source(self) -> Endpoint | None:
        with self.changed:
            return self.plan.next_source()

    def tried_before(self, source: Endpoint) -> bool:
        """Whether `source` is being tried again (it dropped its connection before)."""
        with self.changed:
            return self.plan.tries.get(source, 0) > 1

    def finished(self) -> bool:
        with self.changed:
            return self.plan.finished

    def adopt(self, offered: Manifest, source: Endpoint) -> VerifyingSink:
        """Accept `source`'s manifest if it is the model we expect and, for every source
        after the first, holds the very same bytes (or the model would mix)."""
        with self.changed:
            differences = self.expected.differences(offered)
            if self.reference is not None and not differences:
                differences = _digest_differences(self.reference, offered)
            if differences:
                raise ManifestMismatch.from_differences(differences, source=str(source))
            if self.sink is None:
                self.reference = offered
                self.sink = VerifyingSink(
                    offered,
                    self.dest,
                    progress=self.progress,
                    huge_pages=self.huge_pages,
                    verified=None if self.observer is None else self.observer.arrived,
                    chunks=self.chunks,
                )
                self.plan.load(self.sink.wanted)
                if self.observer is not None:
                    self.observer.begin(offered, self.dest)
            assert self.sink is not None
            return self.sink

    def take(self, source: Endpoint) -> list[Chunk]:
        with self.changed:
            return self.plan.take(source)

    def done(self, source: Endpoint, batch: list[Chunk], seconds: float) -> None:
        with self.changed:
            self.plan.done(source, batch, seconds)
            self.changed.notify_all()

    def leave(self, source: Endpoint) -> None:
        with self.changed:
            self.plan.leave(source)

    def failed(self, source: Endpoint, batch: list[Chunk], exc: TransferError) -> None:
        if (refusal := metrics.kind(exc)) in metrics.REFUSAL_KINDS:
            metrics.REFUSALS.labels(refusal).inc()
        with self.changed:
            sink = self.sink
            undelivered = [c for c in batch if sink is None or not sink.is_done(c)]
            retry = isinstance(exc, PeerClosed)
            self.plan.failed(source, batch, undelivered, str(exc), retry=retry)
            self.last_error = exc
            self.changed.notify_all()

    def wait_for_work(self, source: Endpoint) -> bool:
        """Block while others are still fetching; True (and `source` is active again) if
        chunks came back to the queue (a source failed), False once everything has arrived
        or nobody is fetching."""
        with self.changed:
            self.changed.wait_for(lambda: self.plan.has_work or self.plan.in_flight == 0)
            if self.plan.has_work:
                self.plan.rejoin(source)
            return self.plan.has_work

    def error(self, wanted: int) -> TransferError:
        """The exception for a pull that did not finish: the last source's error type,
        every source's reason, and the tensors that did arrive."""
        completed = self.sink.completed() if self.sink is not None else []
        failures = self.plan.failures
        message = "; ".join(failures) if failures else "no sources configured"
        last = self.last_error
        return (type(last) if last is not None else SourceUnavailable)(
            f"pull incomplete ({len(completed)} of {wanted} tensors verified): {message}",
            source=last.source if last else None,
            completed=completed,
        )


def _digest_differences(reference: Manifest, offered: Manifest) -> list[str]:
    """A later source must hold the very same bytes as the first, or the model would mix."""
    if reference.chunk_bytes != offered.chunk_bytes:
        return [f"chunk size {offered.chunk_bytes} differs from the first source's"]
    if reference.column_tiles != offered.column_tiles:
        return [f"column tiles {offered.column_tiles} differ from the first source's"]
    if reference.tensors != offered.tensors:
        return ["tensors are listed in another order than the first source's"]
    differing = [
        n for n, (a, b) in enumerate(zip(reference.digests, offered.digests, strict=True)) if a != b
    ]
    names = reference.tensor_names(differing)
    return [f"tensor {name!r} content differs from the first source's" for name in names]
