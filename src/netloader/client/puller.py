"""The pulling side: connect and authenticate, adopt a manifest that matches what we
expect, then fetch chunks from every source at once (as the scheduler hands them out),
straight into the caller's tensors, each verified against the manifest's digest."""

from __future__ import annotations

import contextlib
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from netloader import metrics
from netloader import protocol as p
from netloader.client.shared import PullObserver, SharedPull
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import (
    ManifestMismatch,
    NetloaderError,
    PeerClosed,
    ProtocolError,
    ServerBusy,
    SourceUnavailable,
    TransferError,
    TransferTimeout,
    UsageError,
)
from netloader.manifest import Chunk, Identity, Manifest, expected_manifest
from netloader.settings import DEFAULT_TIMEOUTS, Timeouts
from netloader.transports import get as get_transport
from netloader.transports.connection import Connection, connect
from netloader.transports.tls import start_tls

log = logging.getLogger(__name__)

RETRY_PAUSE = 0.5  # seconds (jittered) before connecting again to a source that dropped


@dataclass(frozen=True)
class LoadReport:
    """What a pull did: who sent how much, over what, how fast; and that it was verified."""

    sources: tuple[str, ...]
    transport: str
    tensors: int
    bytes: int
    seconds: float
    verified: bool = True
    failures: tuple[str, ...] = field(default=())  # sources that failed before another finished
    bytes_by_source: tuple[tuple[str, int], ...] = field(default=())
    part: str = p.Part.WEIGHTS.value
    version: str = ""  # the version of the weights that arrived (the sources' manifest's)

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        what = "tensors" if self.part == p.Part.WEIGHTS.value else f"files ({self.part})"
        return (
            f"{self.tensors} {what}, {self.bytes} bytes in {self.seconds:.3f} s "
            f"({self.gbps:.2f} GB/s) from {', '.join(self.sources)} over {self.transport}, "
            f"{'verified' if self.verified else 'NOT verified'}"
        )


class Client:
    """Pulls from `sources`: from `stripe` of them at once (default: all), disjoint parts
    from each, balanced by their speed. A source that fails or stalls is replaced by the
    next untried one, and its unreceived chunks move to the others; finished chunks are
    never fetched twice.

    sources:    "host:port" strings or Endpoints, in order of preference.
    secret:     the shared secret, when the servers require one (or to require that they
                prove they know it).
    transport:  a name from netloader.transports.names() ("auto": the default).
    timeouts:   connect (connect and handshake) and stall (silence while pulling).
    huge_pages: ask Linux for 2 MiB pages on never-touched destination memory; off by
                default (see the README's benchmark section for why).
    stripe:     how many sources to pull from at once (1: one at a time, in order, the
                rest as fallbacks: a relay chain).
    tls:        a client context (netloader.transports.tls.client_context) to require TLS
                with a verified server certificate.
    """

    def __init__(
        self,
        sources: Sequence[Endpoint | str],
        *,
        secret: bytes | None = None,
        transport: str = "auto",
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        huge_pages: bool = False,
        stripe: int | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        try:
            self.sources = [s if isinstance(s, Endpoint) else parse_endpoint(s) for s in sources]
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        self.secret = secret
        self.huge_pages = huge_pages
        self.transport = get_transport(transport)
        self.timeouts = timeouts
        if stripe is not None and stripe < 1:
            raise UsageError(f"stripe must be at least 1, not {stripe}")
        self.stripe = len(self.sources) if stripe is None else stripe
        self.tls = tls
        if (why := self.transport.unavailable()) is not None:
            raise UsageError(why)
        if tls is not None and not self.transport.tls:
            raise UsageError(f"TLS cannot cover the {self.transport.name} transport")

    # ---- public -------------------------------------------------------------------------
    def manifest(self, part: p.Part = p.Part.WEIGHTS, *, version: str = "") -> Manifest:
        """The manifest of `part` (the weights, or the model directory's other files) of
        the first source that answers with a valid one. `version`: ask for that version
        of the weights (a source that keeps an earlier version beside its current one
        offers it; any other answers with what it serves, for the caller to check)."""
        errors: list[str] = []
        dropped: list[Endpoint] = []  # asked once more at the end, as a pull does (RETRIES)
        for source in self.sources:
            try:
                return self._manifest_of(source, part, version)
            except (TransferError, ProtocolError) as exc:
                error = _as_transfer_error(exc, source)
                errors.append(str(error))
                if isinstance(error, PeerClosed):
                    dropped.append(source)
        for source in dropped:
            log.info("netloader: asking %s for its manifest again", source)
            time.sleep(RETRY_PAUSE * random.uniform(0.5, 1.5))
            try:
                return self._manifest_of(source, part, version)
            except (TransferError, ProtocolError) as exc:
                errors.append(str(_as_transfer_error(exc, source)))
        raise SourceUnavailable("no source answered: " + "; ".join(errors or ["no sources given"]))

    def _manifest_of(self, source: Endpoint, part: p.Part, version: str) -> Manifest:
        conn: Connection | None = None
        try:
            conn = self._open(source)
            return self._fetch_manifest(conn, part=part, version=version)
        finally:
            if conn is not None:
                _bye(conn)

    def load_into(
        self,
        dest: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        progress: Callable[[int], None] | None = None,
        observer: PullObserver | None = None,
        within: Manifest | None = None,
        part: p.Part = p.Part.WEIGHTS,
        chunks: Collection[int] | None = None,
    ) -> LoadReport:
        """Fill `dest` (name -> tensor of the right dtype and shape) from the sources.

        dest:     the tensors to fill, in place.
        identity: the model and layout they belong to (the server's must match).
        progress: called with the byte count of each verified chunk.
        observer: told of the adopted manifest and each verified chunk (a relay).
        within:   a manifest from `manifest()`: `dest` names some of its tensors, and only
                  those are pulled, from sources whose manifest is this very one (the
                  same bytes); None: `dest` is the whole model.
        part:     which of the servers' parts to pull (the weights by default).
        chunks:   with `within`: pull only these chunk numbers of it (`Manifest.
                  chunks_covering`), e.g. the rows of each tensor a tensor-parallel rank
                  keeps; the other bytes of `dest` are left as they are. `dest` must then
                  be contiguous host tensors. None: all of every tensor in `dest`.

        Raises a TransferError subclass if not every tensor arrived verified; its
        `completed` names the tensors that did (the others hold undefined bytes).
        """
        started = time.perf_counter()
        if within is not None and (unknown := set(dest) - {t.name for t in within.tensors}):
            raise UsageError(f"not in the manifest: {', '.join(sorted(unknown)[:5])}")
        if chunks is not None and within is None:
            raise UsageError("pulling some chunks needs the manifest they belong to (within)")
        if chunks is not None and not all(t.is_cpu and t.is_contiguous() for t in dest.values()):
            raise UsageError("pulling some chunks needs contiguous host tensors to land in")
        metrics.TRANSFERS_STARTED.labels("client").inc()
        failure: TransferError | None = None
        try:
            return self._load(dest, identity, progress, observer, within, part, chunks, started)
        except TransferError as exc:
            failure = exc
            raise
        finally:
            metrics.TRANSFERS_FINISHED.labels("client", metrics.kind(failure)).inc()
            metrics.TRANSFER_SECONDS.labels("client").observe(time.perf_counter() - started)

    def _load(
        self,
        dest: Mapping[str, torch.Tensor],
        identity: Identity,
        progress: Callable[[int], None] | None,
        observer: PullObserver | None,
        within: Manifest | None,
        part: p.Part,
        chunks: Collection[int] | None,
        started: float,
    ) -> LoadReport:
        expected = within or expected_manifest(identity, dest)
        pull = SharedPull(
            expected, dest, self.sources, progress, observer, self.huge_pages, within, part, chunks
        )
        # Sources are handed out before any worker starts, so the first to connect knows
        # it is not alone and leaves work for the others.
        first = [pull.next_source() for _ in range(min(self.stripe, len(self.sources)))]
        workers = [
            # Daemon threads: a caller that gives up (a signal) need not wait for them.
            threading.Thread(
                target=self._work, args=(pull, source), name=f"netloader-{source}", daemon=True
            )
            for source in first[1:]
        ]
        for worker in workers:
            worker.start()
        self._work(pull, first[0] if first else None)  # the calling thread is a worker too
        for worker in workers:
            worker.join()
        if pull.sink is not None:
            pull.sink.settle()  # device copies still in flight
        if not pull.finished():
            error = pull.error(len(dest))
            if observer is not None:
                observer.fail(str(error))
            raise error
        assert pull.sink is not None
        report = LoadReport(
            sources=tuple(pull.plan.delivered),
            transport="+".join(sorted(pull.transports)) or self.transport.name,
            tensors=len(dest),
            bytes=pull.sink.bytes,
            seconds=time.perf_counter() - started,
            failures=tuple(pull.plan.failures),
            bytes_by_source=tuple(pull.plan.delivered.items()),
            part=part.value,
            version=pull.sink.manifest.identity.version,
        )
        log.info("netloader: loaded %s", report.summary())
        return report

    # ---- one worker: a source at a time -------------------------------------------------
    def _work(self, pull: SharedPull, source: Endpoint | None) -> None:
        again = False  # `source` dropped its connection before: pause first
        while source is not None:
            conn: Connection | None = None
            batch: list[Chunk] = []  # in flight; handed back to the queue if the source fails
            if again:
                log.info("netloader: trying %s again, as no other source is left", source)
                time.sleep(RETRY_PAUSE * random.uniform(0.5, 1.5))
                again = False
            try:
                conn = self._open(source)
                offered = self._fetch_manifest(
                    conn, len(pull.expected.tensors), pull.part, pull.expected.identity.version
                )
                sink = pull.adopt(offered, source)
                while batch := pull.take(source):
                    started = time.perf_counter()
                    transport = self.transport.for_connection(conn, sink)
                    conn.send(p.Fetch(transport.name, tuple(c.number for c in batch)))
                    transport.receive_chunks(conn, batch, sink, self.timeouts)
                    pull.transports.add(transport.for_connection(conn).name)
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
                again = source is not None and pull.tried_before(source)
                continue
            # Nothing left to take: stay available in case another source fails.
            if not pull.wait_for_work(source):
                return

    # ---- one connection -----------------------------------------------------------------
    def _open(self, source: Endpoint) -> Connection:
        """Connect, (TLS,) and run the handshake, all within the connect timeout. A busy
        server (at a connection cap) is asked again after a jittered pause, while the
        connect timeout lasts."""
        deadline = time.monotonic() + self.timeouts.connect
        pause = 0.05
        busy: ServerBusy | None = None
        while True:
            try:
                return self._open_once(source, deadline)
            except ServerBusy as exc:
                busy = exc
                pause = min(pause * 2, 1.0)
                wait = pause * random.uniform(0.5, 1.5)
                if time.monotonic() + wait >= deadline:
                    raise
                time.sleep(wait)
            except TransferTimeout:
                # A retry that ran out of time says less than the refusal that caused it.
                if busy is not None:
                    raise busy from None
                raise

    def _open_once(self, source: Endpoint, deadline: float) -> Connection:
        peer = str(source)
        try:
            sock = connect(source.host, source.port, max(deadline - time.monotonic(), 1e-3))
        except OSError as exc:
            raise SourceUnavailable(f"cannot connect to {source}: {exc}", source=peer) from exc
        if self.tls is not None:
            sock = start_tls(
                sock,
                self.tls,
                peer=peer,
                timeout=self.timeouts.connect,
                server_hostname=source.host,
            )
        conn = Connection(sock, peer, p.ClientSession(self.secret, peer))
        try:
            conn.settimeout(self.timeouts.connect)
            left = max(deadline - time.monotonic(), 1e-3)
            with conn.within(left, "connecting and the handshake"):
                self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        conn.settimeout(self.timeouts.stall)
        return conn

    def _handshake(self, conn: Connection) -> None:
        session = conn.session
        assert isinstance(session, p.ClientSession)
        conn.send_bytes(session.hello())
        try:
            conn.expect(p.Welcome)  # the session checks the server's version and proof
        except PeerClosed as exc:
            hint = "" if self.tls is not None else " (does it require TLS?)"
            raise PeerClosed(f"{exc} before its welcome{hint}", source=conn.peer) from exc
        auth = session.auth()
        if auth is not None:
            conn.send_bytes(auth)

    def _fetch_manifest(
        self,
        conn: Connection,
        tensors: int | None = None,
        part: p.Part = p.Part.WEIGHTS,
        version: str = "",
    ) -> Manifest:
        """The server's manifest of `part` (asking for `version` of the weights, if any);
        `tensors`: how many it should list (bounds its size)."""
        if tensors is not None:
            conn.session.expect_manifest(tensors)
        conn.send(p.GetManifest(part, version))
        manifest = conn.expect(p.ManifestMessage).manifest
        if len(manifest.digests) != manifest.chunk_total:
            raise ProtocolError(f"{conn.peer} sent a manifest without digests")
        return manifest


def _as_transfer_error(caught: BaseException, source: Endpoint) -> TransferError:
    if isinstance(caught, TransferError):
        return caught
    if isinstance(caught, ProtocolError):
        return TransferError(f"{source} broke the protocol: {caught}", source=str(source))
    # A bug must not leave the other workers waiting for this one: it fails this source.
    log.error("netloader: pulling from %s failed", source, exc_info=caught)
    return TransferError(f"{source}: internal error: {caught!r}", source=str(source))


def _bye(conn: Connection) -> None:
    """Say goodbye where the conversation allows it, then close."""
    if conn.session.phase is p.Phase.READY:
        with contextlib.suppress(NetloaderError):
            conn.send(p.Bye())
    conn.close()
