"""One client's conversation with a server: TLS, handshake, then answering GET_MANIFEST
and FETCH until BYE. Runs in that connection's own thread; every failure ends this
conversation only, with an ERROR frame saying why where the peer can still read one."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable, Mapping

import torch

from netloader import metrics
from netloader import protocol as p
from netloader.errors import (
    AuthenticationError,
    NetloaderError,
    ProtocolError,
    SourceUnavailable,
    VersionMismatch,
)
from netloader.manifest import Chunk, Manifest
from netloader.server.holdings import Holdings, PartOfModel
from netloader.server.pacing import Pacer
from netloader.settings import Timeouts
from netloader.staging import Slot
from netloader.transports import REGISTRY
from netloader.transports.connection import Connection
from netloader.transports.tls import start_tls

log = logging.getLogger(__name__)

# Waits for a relay's chunks end before the client's own stall timeout would give up on us.
ANSWER_WITHIN = 0.8


class HeldChunks:
    """ChunkSource over a server's holdings for one FETCH: views into the tensors' host
    memory, or a slot of the holdings' ring for device tensors (see HostBytes), given back
    at `release`. Waits, at most `wait` seconds, for chunks a relay has not received yet,
    and for the server's send rate (`pacer`)."""

    def __init__(self, holdings: Holdings, wait: float, pacer: Pacer | None = None) -> None:
        self.holdings = holdings
        self.wait = wait
        self.pacer = pacer
        self._slots: dict[int, Slot] = {}  # chunk -> its ring slot, until released

    def _wait(self, chunk: Chunk) -> None:
        self.holdings.wait_for(chunk, self.wait)
        if self.pacer is not None:
            self.pacer.take(chunk.length)

    def views(self, chunk: Chunk) -> list[memoryview]:
        """One per piece; a strided piece (a column tile) packed, in one copy; valid until
        `release(chunk)`."""
        self._wait(chunk)
        views, slot = self.holdings.views(chunk)
        if slot is not None:
            self._slots[chunk.number] = slot
        return views

    def release(self, chunk: Chunk) -> None:
        slot = self._slots.pop(chunk.number, None)
        if slot is not None:
            self.holdings.release(slot)

    def release_all(self) -> None:
        """Give back every slot still held (a transfer that failed midway)."""
        for number in list(self._slots):
            self.release(Chunk(number, (), 0))

    def addresses(self, chunk: Chunk) -> list[int]:
        """Where each piece starts (a strided piece's runs follow at its stride): the
        tensors' whole host copies (a staged tensor's copy is made once, whole)."""
        self._wait(chunk)
        return [self.holdings.host(p.tensor).address + p.offset for p in chunk.pieces]

    def regions(self, chunk: Chunk) -> list[torch.Tensor]:
        self.holdings.wait_for(chunk, self.wait)
        return [self.holdings.host(p.tensor).flat for p in chunk.pieces]

    def ready(self, chunk: Chunk) -> None:
        self._wait(chunk)

    def tensors(self, chunk: Chunk) -> list[torch.Tensor]:
        return [self.holdings.tensor(p.tensor) for p in chunk.pieces]


def _checkpoint_of(checkpoints: Mapping[str, Manifest]) -> Callable[[str], Holdings]:
    """The CHECKPOINT part: the manifest of the checkpoint the asked version came from,
    offered without its bytes."""

    def holding(version: str) -> Holdings:
        manifest = checkpoints.get(version)
        if manifest is None:
            known = ", ".join(repr(v) for v in checkpoints) or "none"
            raise SourceUnavailable(
                f"this server knows no checkpoint of version {version!r} (it knows {known})"
            )
        return PartOfModel({}, manifest, lacking="only the checkpoint's manifest is offered")

    return holding


class Conversation:
    """What a server says to one connected client.

    conn:      the accepted connection (its session a ServerSession).
    weights:   the weights to offer a client that asks for a version ("": any), fixed for
               this conversation (see Server.serve_instead and `choose_weights`).
    files:     the model directory's other files, if offered.
    compile_cache: makes the compile cache's holdings when a client asks, if offered.
    checkpoints: the manifests of the checkpoints the weights' versions came from, by
               version (Server.offer_checkpoints).
    timeouts:  handshake (for TLS and the handshake), stall (afterwards).
    transfers: the server's semaphore of transfers in progress.
    tls:       a server context, to require TLS before anything else.
    closing:   set when the server is shutting down (quieter logs).
    draining:  set when the server drains: no new transfer starts.
    pacer:     the server's send rate, shared by its transfers.
    """

    def __init__(
        self,
        conn: Connection,
        weights: Callable[[str], Holdings],
        *,
        files: Holdings | None = None,
        compile_cache: Callable[[], Holdings] | None = None,
        checkpoints: Mapping[str, Manifest] | None = None,
        timeouts: Timeouts,
        transfers: threading.BoundedSemaphore,
        max_transfers: int,
        tls: ssl.SSLContext | None,
        closing: threading.Event,
        draining: threading.Event | None = None,
        pacer: Pacer | None = None,
    ) -> None:
        self.conn = conn
        self.pacer = pacer
        # What each part's holdings are when a client asks for it (and a version of it).
        self.parts: dict[p.Part, Callable[[str], Holdings] | None] = {
            p.Part.WEIGHTS: weights,
            p.Part.FILES: None if files is None else lambda _: files,
            p.Part.COMPILE_CACHE: None if compile_cache is None else lambda _: compile_cache(),
            p.Part.CHECKPOINT: None if not checkpoints else _checkpoint_of(checkpoints),
        }
        self.timeouts = timeouts
        self.transfers = transfers
        self.max_transfers = max_transfers
        self.tls = tls
        self.closing = closing
        self.draining = draining or threading.Event()
        self.opened = time.monotonic()
        self.authenticated = threading.Event()  # handshake done: no longer shed first

    def run(self) -> None:
        """Converse until BYE or a failure; never raises."""
        conn = self.conn
        metrics.CONNECTIONS_OPEN.inc()
        try:
            self._converse()
        except SourceUnavailable as exc:  # nothing (more) to offer this client: say why
            log.info("netloader: told %s: %s", conn.peer, exc)
            conn.try_send(p.Error(p.ErrorCode.UNAVAILABLE, str(exc)))
        except VersionMismatch as exc:
            metrics.REFUSALS.labels("version").inc()
            log.warning("netloader: %s: %s; refused", conn.peer, exc)
            conn.try_send(p.Error(p.ErrorCode.VERSION, str(exc)))
        except AuthenticationError:
            metrics.REFUSALS.labels("auth").inc()
            log.warning("netloader: %s failed authentication", conn.peer)
            conn.try_send(p.Error(p.ErrorCode.AUTH, "authentication failed"))
        except (NetloaderError, OSError) as exc:
            level = logging.DEBUG if self.closing.is_set() else logging.WARNING
            log.log(level, "netloader: connection from %s ended: %s", conn.peer, exc)
            if isinstance(exc, ProtocolError):
                conn.try_send(p.Error(p.ErrorCode.BAD_REQUEST, str(exc)))
        except Exception:  # a bug in one connection must never reach the host process
            log.exception("netloader: connection from %s failed", conn.peer)
            conn.try_send(p.Error(p.ErrorCode.INTERNAL, "internal server error"))
        finally:
            metrics.CONNECTIONS_OPEN.dec()
            conn.close()

    def _converse(self) -> None:
        conn = self.conn
        session = conn.session
        assert isinstance(session, p.ServerSession)
        if self.tls is not None:
            conn.sock = start_tls(
                conn.sock, self.tls, peer=conn.peer, timeout=self.timeouts.handshake
            )
        conn.settimeout(self.timeouts.handshake)
        with conn.within(self.timeouts.handshake, "the handshake"):
            welcome = session.welcome(conn.expect(p.Hello))
            if session.secret is None:  # done once WELCOME is out: no longer shed first,
                self.authenticated.set()  # even if the client acts on it before we go on
            conn.send_bytes(welcome)
            if session.secret is not None:
                conn.expect(p.Auth)  # the session checks the proof
        self.authenticated.set()
        conn.settimeout(self.timeouts.stall)
        answer_within = ANSWER_WITHIN * self.timeouts.stall
        # The weights unless the client asked for another part: FETCHes name its chunks.
        weights = self.parts[p.Part.WEIGHTS]
        assert weights is not None
        holdings = weights("")
        manifest = holdings.manifest(answer_within)
        session.expect_fetches(manifest.chunk_total)
        while True:
            message = conn.receive()
            if isinstance(message, p.Bye):
                return
            if self.draining.is_set() and isinstance(message, (p.GetManifest, p.Fetch)):
                raise SourceUnavailable("server is draining (shutting down): go elsewhere")
            if isinstance(message, p.GetManifest):
                offered = self.parts[message.part]
                if offered is None:
                    raise SourceUnavailable(f"this server offers no {message.part.value}")
                holdings = offered(message.version)
                manifest = holdings.manifest(answer_within)
                session.expect_fetches(manifest.chunk_total)
                conn.send(p.ManifestMessage(manifest))
            elif isinstance(message, p.Fetch):
                self._fetch(message.validate(manifest), holdings, manifest, answer_within)

    def _fetch(
        self, fetch: p.Fetch, holdings: Holdings, manifest: Manifest, answer_within: float
    ) -> None:
        transport = REGISTRY.get(fetch.transport)
        if transport is None:
            raise ProtocolError(f"unknown transport {fetch.transport!r}")
        if self.tls is not None and not transport.tls:
            raise ProtocolError(f"this server uses TLS: transport {fetch.transport!r} refused")
        if not self.transfers.acquire(blocking=False):
            metrics.REFUSALS.labels("busy").inc()
            raise SourceUnavailable(
                f"server busy: {self.max_transfers} transfers in progress (limit)"
            )
        metrics.TRANSFERS_STARTED.labels("server").inc()
        chunks = [manifest.chunks[c] for c in fetch.chunks]
        sent = sum(c.length for c in chunks)
        started = time.perf_counter()
        failure: BaseException | None = None
        held = HeldChunks(holdings, answer_within, self.pacer)
        try:
            transport.send_chunks(self.conn, held, chunks, self.timeouts)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            held.release_all()
            self.transfers.release()
            seconds = time.perf_counter() - started
            metrics.TRANSFERS_FINISHED.labels("server", metrics.kind(failure)).inc()
            metrics.TRANSFER_SECONDS.labels("server").observe(seconds)
            if failure is None:
                metrics.SENT_BYTES.inc(sent)
        log.info(
            "netloader: sent %d chunks, %d bytes to %s over %s in %.3f s (%.2f GB/s)",
            len(chunks),
            sent,
            self.conn.peer,
            transport.name,
            seconds,
            sent / max(seconds, 1e-9) / 1e9,
        )
