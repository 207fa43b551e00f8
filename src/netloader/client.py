"""The pulling side: handshake, manifest check, then bytes straight into the caller's
tensors, chunk by chunk, each verified against the server's digest."""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from netloader import protocol as p
from netloader.connection import Connection, connect
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import (
    AuthenticationError,
    IntegrityError,
    ManifestMismatch,
    NetloaderError,
    PeerClosed,
    ProtocolError,
    SourceUnavailable,
    TransferError,
    VersionMismatch,
)
from netloader.holdings import Arrivals
from netloader.manifest import (
    PROTOCOL_VERSION,
    Chunk,
    Identity,
    Manifest,
    digest,
    expected_manifest,
)
from netloader.tensors import advise_huge_pages, byte_view, flat_bytes, prefault
from netloader.transports import process_group, tcp

log = logging.getLogger(__name__)

DEFAULT_TRANSPORT = "tcp"  # chosen by measurement: see README, "Benchmark"
# Striping: a source's first batch, before its speed is known, and later batches' length
# in seconds at its measured speed (short enough to rebalance, long enough that a
# request's round trip is noise).
FIRST_BATCH_BYTES = 8 << 20
BATCH_SECONDS = 0.25


@dataclass(frozen=True)
class LoadReport:
    sources: tuple[str, ...]
    transport: str
    tensors: int
    bytes: int
    seconds: float
    verified: bool = True
    failures: tuple[str, ...] = field(default=())  # sources that failed before another finished
    bytes_by_source: tuple[tuple[str, int], ...] = field(default=())

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors, {self.bytes} bytes in {self.seconds:.3f} s "
            f"({self.gbps:.2f} GB/s) from {', '.join(self.sources)} over {self.transport}, "
            f"{'verified' if self.verified else 'NOT verified'}"
        )


class _VerifyingSink:
    """Where chunks land (the caller's tensor memory, or a staging buffer when that memory
    is not contiguous host memory) and the digest check that accepts them. Safe to use from
    several receiving threads at once: each chunk has one writer."""

    def __init__(
        self,
        manifest: Manifest,
        dest: Mapping[str, torch.Tensor],
        progress: Callable[[int], None] | None,
        huge_pages: bool = False,
        verified: Callable[[Chunk], None] | None = None,
    ) -> None:
        self.manifest = manifest
        self.dest = [dest[t.name] for t in manifest.tensors]
        # Write straight into contiguous host tensors; stage the rest and copy when complete.
        self.staged = [t.device.type != "cpu" or not t.is_contiguous() for t in self.dest]
        self.views = [
            torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
            if staged
            else flat_bytes(t)
            for t, staged in zip(self.dest, self.staged, strict=True)
        ]
        if huge_pages:
            for view in self.views:
                advise_huge_pages(view)
        self.missing = {t: manifest.chunk_count(t) for t in range(len(manifest.tensors))}
        self.done_chunks: set[tuple[int, int]] = set()
        self.bytes = 0
        self.progress = progress
        self.verified = verified
        self._lock = threading.Lock()

    def destination(self, chunk: Chunk) -> torch.Tensor:
        view = self._view(chunk)
        prefault(view)
        return view

    def _view(self, chunk: Chunk) -> torch.Tensor:
        return self.views[chunk.tensor][chunk.offset : chunk.offset + chunk.length]

    def received(self, chunk: Chunk, arrived: str | None = None) -> None:
        entry = self.manifest.tensors[chunk.tensor]
        if arrived is None:
            arrived = digest(byte_view(self._view(chunk)))
        if arrived != entry.digests[chunk.number]:
            raise IntegrityError(
                f"tensor {entry.name!r} chunk {chunk.number}: digest mismatch, bytes rejected"
            )
        with self._lock:
            self.done_chunks.add((chunk.tensor, chunk.number))
            self.bytes += chunk.length
            self.missing[chunk.tensor] -= 1
            tensor_complete = self.missing[chunk.tensor] == 0
            if self.progress is not None:
                self.progress(chunk.length)
        if not self.staged[chunk.tensor]:
            if self.verified is not None:
                self.verified(chunk)
        elif tensor_complete:
            target = self.dest[chunk.tensor]
            target.copy_(self.views[chunk.tensor].view(target.dtype).reshape(target.shape))
            if self.verified is not None:  # staged bytes are servable only once in place
                for number in range(self.manifest.chunk_count(chunk.tensor)):
                    self.verified(self.manifest.chunk(chunk.tensor, number))

    def is_done(self, chunk: Chunk) -> bool:
        with self._lock:
            return (chunk.tensor, chunk.number) in self.done_chunks

    def completed(self) -> list[str]:
        with self._lock:
            return [t.name for i, t in enumerate(self.manifest.tensors) if self.missing[i] == 0]


class _Pull:
    """The shared state of one `load_into`: the adopted manifest, the chunks nobody is
    fetching yet, the sources still to try, and each source's observed speed.

    Sources hand out work in batches sized by their measured speed, so fast sources take
    more, and all finish at about the same time. A failed source's unreceived chunks go
    back to the queue for the others; nothing received is fetched again.
    """

    def __init__(
        self,
        expected: Manifest,
        dest: Mapping[str, torch.Tensor],
        sources: Sequence[Endpoint],
        progress: Callable[[int], None] | None,
        huge_pages: bool,
        arrivals: Arrivals | None,
    ) -> None:
        self.expected = expected
        self.dest = dest
        self.progress = progress
        self.huge_pages = huge_pages
        self.arrivals = arrivals
        self.changed = threading.Condition()
        self.reference: Manifest | None = None
        self.sink: _VerifyingSink | None = None
        self.pending: deque[Chunk] = deque()
        self.pending_bytes = 0
        self.in_flight = 0
        self.untried = deque(sources)
        self.active: set[Endpoint] = set()  # sources a worker is on (connecting or fetching)
        self.rates: dict[Endpoint, float] = {}  # bytes per second, smoothed
        self.delivered: dict[str, int] = {}  # bytes per source, in order of first delivery
        self.failures: list[str] = []
        self.last_error: TransferError | None = None

    def next_source(self) -> Endpoint | None:
        with self.changed:
            if self.finished() or not self.untried:
                return None
            source = self.untried.popleft()
            self.active.add(source)
            return source

    def finished(self) -> bool:
        return self.reference is not None and not self.pending and self.in_flight == 0

    def adopt(self, offered: Manifest, source: Endpoint) -> _VerifyingSink:
        """Accept `source`'s manifest if it is the model we expect and, for every source
        after the first, holds the very same bytes (or the model would mix)."""
        with self.changed:
            differences = self.expected.differences(offered)
            if self.reference is not None and not differences:
                differences = _digest_differences(self.reference, offered)
            if differences:
                raise ManifestMismatch.from_differences(differences, source=str(source))
            if self.reference is None:
                self.reference = offered
                self.sink = _VerifyingSink(
                    offered,
                    self.dest,
                    self.progress,
                    self.huge_pages,
                    None if self.arrivals is None else self.arrivals.arrived,
                )
                self.pending.extend(offered.chunks())
                self.pending_bytes = offered.total_bytes
                if self.arrivals is not None:
                    self.arrivals.begin(offered, self.dest)
            assert self.sink is not None
            return self.sink

    def take(self, source: Endpoint) -> list[Chunk]:
        """The next batch for `source`; empty when nothing is waiting to be fetched."""
        with self.changed:
            if not self.pending:
                return []
            budget = self._budget(source)
            batch: list[Chunk] = []
            while self.pending and (not batch or sum(c.length for c in batch) < budget):
                batch.append(self.pending.popleft())
            self.pending_bytes -= sum(c.length for c in batch)
            self.in_flight += 1
            return batch

    def _budget(self, source: Endpoint) -> float:
        if len(self.active) <= 1:
            return self.pending_bytes  # alone: everything in one request, no round trips
        known = [self.rates[s] for s in self.active if s in self.rates]
        rate = self.rates.get(source)
        if rate is None:
            return min(FIRST_BATCH_BYTES, self.pending_bytes / len(self.active))
        total = sum(known) + (len(self.active) - len(known)) * (sum(known) / len(known))
        share = self.pending_bytes * rate / total  # finish together with the others
        return min(share, rate * BATCH_SECONDS)

    def done(self, source: Endpoint, batch: list[Chunk], seconds: float) -> None:
        size = sum(c.length for c in batch)
        rate = size / max(seconds, 1e-6)
        with self.changed:
            self.in_flight -= 1
            old = self.rates.get(source)
            self.rates[source] = rate if old is None else (old + rate) / 2
            self.delivered[str(source)] = self.delivered.get(str(source), 0) + size
            self.changed.notify_all()

    def leave(self, source: Endpoint) -> None:
        with self.changed:
            self.active.discard(source)

    def failed(self, source: Endpoint, batch: list[Chunk], exc: TransferError) -> None:
        """`source` is out; what it did not deliver of `batch` goes back to the queue."""
        with self.changed:
            self.active.discard(source)
            if batch:
                self.in_flight -= 1
                assert self.sink is not None
                undelivered = [c for c in batch if not self.sink.is_done(c)]
                delivered = sum(c.length for c in batch) - sum(c.length for c in undelivered)
                if delivered:
                    self.delivered[str(source)] = self.delivered.get(str(source), 0) + delivered
                self.pending.extendleft(reversed(undelivered))
                self.pending_bytes += sum(c.length for c in undelivered)
            text = str(exc)
            self.failures.append(text if str(source) in text else f"{source}: {text}")
            self.last_error = exc
            self.changed.notify_all()

    def wait_for_work(self, source: Endpoint) -> bool:
        """Block while others are still fetching; True (and `source` is active again) if
        chunks came back to the queue (a source failed), False once everything has arrived
        or nobody is fetching."""
        with self.changed:
            self.changed.wait_for(lambda: bool(self.pending) or self.in_flight == 0)
            if self.pending:
                self.active.add(source)
            return bool(self.pending)


class Client:
    """Pulls from `sources`: from `stripe` of them at once (default: all), disjoint parts
    from each, balanced by their speed. A source that fails or stalls is replaced by the
    next untried one, and its unreceived chunks move to the others; finished chunks are
    never fetched twice."""

    def __init__(
        self,
        sources: Sequence[Endpoint | str],
        *,
        secret: bytes | None = None,
        transport: str = "auto",
        connect_timeout: float = 5.0,
        stall_timeout: float = 10.0,
        huge_pages: bool = False,
        stripe: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`huge_pages`: ask Linux for 2 MiB pages on never-touched destination memory.
        Measured here it roughly halves the median fresh-memory pull but with spikes to
        twice the plain time (synchronous compaction), and was slower inside vLLM, so it
        is off by default. `stripe=1` pulls from one source at a time, in order (a relay
        chain: the upstream first, the others as fallbacks). `tls`: a client context
        (netloader.tls.client_context) to require TLS with a verified server certificate."""
        self.sources = [s if isinstance(s, Endpoint) else parse_endpoint(s) for s in sources]
        self.secret = secret
        self.huge_pages = huge_pages
        self.transport = DEFAULT_TRANSPORT if transport == "auto" else transport
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        if stripe is not None and stripe < 1:
            raise ValueError(f"stripe must be at least 1, not {stripe}")
        self.stripe = len(self.sources) if stripe is None else stripe
        self.tls = tls
        if tls is not None and self.transport != tcp.NAME:
            raise ValueError(f"TLS protects the tcp transport only, not {self.transport}")

    # ---- public -------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        """The first reachable source's manifest."""
        errors: list[str] = []
        for source in self.sources:
            try:
                conn = self._open(source)
            except TransferError as exc:
                errors.append(str(exc))
                continue
            try:
                return self._fetch_manifest(conn)
            finally:
                _bye(conn)
        raise SourceUnavailable("no source answered: " + "; ".join(errors or ["no sources given"]))

    def load_into(
        self,
        dest: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        progress: Callable[[int], None] | None = None,
        arrivals: Arrivals | None = None,
    ) -> LoadReport:
        """Fill `dest` (name -> tensor of the right dtype and shape) from the sources.
        With `arrivals`, report each verified chunk there, so a server can relay it.

        Raises a TransferError subclass if not every tensor arrived verified; its
        `completed` names the tensors that did (the others hold undefined bytes).
        """
        started = time.perf_counter()
        pull = _Pull(
            expected_manifest(identity, dest),
            dest,
            self.sources,
            progress,
            self.huge_pages,
            arrivals,
        )
        # Sources are handed out before any worker starts, so the first to connect knows
        # it is not alone and leaves work for the others.
        first = [pull.next_source() for _ in range(min(self.stripe, len(self.sources)))]
        workers = [
            threading.Thread(target=self._work, args=(pull, source), name=f"netloader-{source}")
            for source in first[1:]
        ]
        for worker in workers:
            worker.start()
        self._work(pull, first[0] if first else None)  # the calling thread is a worker too
        for worker in workers:
            worker.join()
        if not pull.finished():
            completed = pull.sink.completed() if pull.sink is not None else []
            message = "; ".join(pull.failures) if pull.failures else "no sources configured"
            last = pull.last_error
            error = (type(last) if last is not None else SourceUnavailable)(
                f"pull incomplete ({len(completed)} of {len(dest)} tensors verified): {message}",
                source=last.source if last else None,
                completed=completed,
            )
            if arrivals is not None:
                arrivals.fail(str(error))
            raise error
        assert pull.sink is not None
        report = LoadReport(
            sources=tuple(pull.delivered),
            transport=self.transport,
            tensors=len(dest),
            bytes=pull.sink.bytes,
            seconds=time.perf_counter() - started,
            failures=tuple(pull.failures),
            bytes_by_source=tuple(pull.delivered.items()),
        )
        log.info("netloader: loaded %s", report.summary())
        return report

    # ---- one worker: a source at a time -------------------------------------------------
    def _work(self, pull: _Pull, source: Endpoint | None) -> None:
        while source is not None:
            conn: Connection | None = None
            batch: list[Chunk] = []  # in flight; handed back to the queue if the source fails
            try:
                conn = self._open(source)
                sink = pull.adopt(self._fetch_manifest(conn), source)
                while batch := pull.take(source):
                    started = time.perf_counter()
                    self._receive(conn, batch, sink)
                    pull.done(source, batch, time.perf_counter() - started)
                pull.leave(source)
                _bye(conn)  # an idle connection is closed, not held open on the server
            except Exception as caught:
                exc = _as_transfer_error(caught, source)
                if conn is not None:
                    # Polite goodbye where the stream is still in step (nothing was fetched).
                    _bye(conn) if isinstance(exc, ManifestMismatch) else conn.close()
                pull.failed(source, batch, exc)
                log.warning("netloader: source %s failed: %s", source, exc)
                source = pull.next_source()
                continue
            # Nothing left to take: stay available in case another source fails.
            if not pull.wait_for_work(source):
                return

    # ---- one connection -----------------------------------------------------------------
    def _open(self, source: Endpoint) -> Connection:
        try:
            sock = connect(source.host, source.port, self.connect_timeout)
        except OSError as exc:
            raise SourceUnavailable(
                f"cannot connect to {source}: {exc}", source=str(source)
            ) from exc
        if self.tls is not None:
            try:
                sock = self.tls.wrap_socket(sock, server_hostname=source.host)
            except ssl.SSLCertVerificationError as exc:
                sock.close()
                raise AuthenticationError(
                    f"TLS: {source} presented a certificate we cannot trust: {exc.verify_message}",
                    source=str(source),
                ) from exc
            except (ssl.SSLError, OSError) as exc:
                sock.close()
                raise SourceUnavailable(
                    f"TLS handshake with {source} failed (does it use TLS?): {exc}",
                    source=str(source),
                ) from exc
        conn = Connection(sock, str(source))
        try:
            self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        conn.settimeout(self.stall_timeout)
        return conn

    def _handshake(self, conn: Connection) -> None:
        conn.settimeout(self.connect_timeout)
        nonce = p.new_nonce()
        conn.send(p.Hello(PROTOCOL_VERSION, nonce).encode())
        try:
            _, body = conn.recv_message(p.MsgType.WELCOME)
        except PeerClosed as exc:
            hint = "" if self.tls is not None else " (does it require TLS?)"
            raise PeerClosed(f"{exc} before its welcome{hint}", source=conn.peer) from exc
        welcome = p.Welcome.decode(body)
        if welcome.protocol != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"{conn.peer} speaks protocol {welcome.protocol}, we speak {PROTOCOL_VERSION}",
                source=conn.peer,
            )
        if welcome.auth and self.secret is None:
            raise AuthenticationError(
                f"authentication: {conn.peer} requires a secret and none is configured",
                source=conn.peer,
            )
        if self.secret is not None:
            if not welcome.auth or not p.proof_matches(
                self.secret, "server", nonce, welcome.nonce, welcome.proof
            ):
                raise AuthenticationError(
                    f"authentication: {conn.peer} could not prove it knows the shared secret",
                    source=conn.peer,
                )
            conn.send(
                p.encode(
                    p.MsgType.AUTH, {"proof": p.proof(self.secret, "client", welcome.nonce, nonce)}
                )
            )

    def _fetch_manifest(self, conn: Connection) -> Manifest:
        conn.send(p.encode(p.MsgType.GET_MANIFEST, {}))
        _, body = conn.recv_message(p.MsgType.MANIFEST)
        manifest = Manifest.from_json(body)
        if any(not t.digests for t in manifest.tensors):
            raise ProtocolError(f"{conn.peer} sent a manifest without digests")
        return manifest

    def _receive(self, conn: Connection, chunks: list[Chunk], sink: _VerifyingSink) -> None:
        conn.send(p.Fetch(self.transport, tuple((c.tensor, c.number) for c in chunks)).encode())
        if self.transport == tcp.NAME:
            tcp.receive_chunks(conn, chunks, sink)
        else:
            process_group.receive_chunks(
                conn, chunks, sink, backend=self.transport, timeout=self.stall_timeout
            )


def _as_transfer_error(caught: Exception, source: Endpoint) -> TransferError:
    if isinstance(caught, TransferError):
        return caught
    if isinstance(caught, ProtocolError):
        return TransferError(f"{source} broke the protocol: {caught}", source=str(source))
    # A bug must not leave the other workers waiting for this one: it fails this source.
    log.error("netloader: pulling from %s failed", source, exc_info=caught)
    return TransferError(f"{source}: internal error: {caught!r}", source=str(source))


def _digest_differences(reference: Manifest, offered: Manifest) -> list[str]:
    """A later source must hold the very same bytes as the first, or the model would mix."""
    if reference.chunk_bytes != offered.chunk_bytes:
        return [f"chunk size {offered.chunk_bytes} differs from the first source's"]
    theirs = {t.name: t.digests for t in offered.tensors}
    return [
        f"tensor {t.name!r} content differs from the first source's"
        for t in reference.tensors
        if theirs.get(t.name) != t.digests
    ]


def _bye(conn: Connection) -> None:
    with contextlib.suppress(NetloaderError):
        conn.send(p.encode(p.MsgType.BYE, {}))
    conn.close()
