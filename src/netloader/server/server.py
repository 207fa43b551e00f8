"""The serving side: a listener whose background threads hand out a model's tensors,
verified by digest, to any number of clients at once, without disturbing the host
process. `Relay` is a server for a model that is still arriving."""

from __future__ import annotations

import functools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import TypedDict, Unpack

import torch

from netloader import metrics
from netloader import protocol as p
from netloader.endpoint import Endpoint
from netloader.manifest import DEFAULT_CHUNK_BYTES, Identity, Manifest
from netloader.server.conversation import Conversation
from netloader.server.holdings import Arrivals, Holdings, LoadedTensors
from netloader.server.pacing import Pacer, lower_this_thread
from netloader.settings import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, Limits, Timeouts
from netloader.transports.connection import Connection

log = logging.getLogger(__name__)

ACCEPT_POLL = 0.2
DRAINING = "server is draining (shutting down): go elsewhere"
LOOPBACK_ANY_PORT = Endpoint("127.0.0.1", 0)


class ServerOptions(TypedDict, total=False):
    """Server's keyword arguments, for those that pass them on (Relay, ranks.py)."""

    listen: Endpoint
    advertise_host: str | None
    secret: bytes | None
    timeouts: Timeouts
    limits: Limits
    tls: ssl.SSLContext | None


class Server:
    """Serves `holdings` (a loaded model, or one still arriving at a relay). Construction
    binds the listener and returns at once; everything else happens in background threads.
    Call `close()` (or use it as a context manager) to stop.

    files:          the model directory's other files (config, tokenizer), offered as the
                    FILES part (netloader.files.model_files); None offers none.
    compile_cache:  called when a client asks for the COMPILE_CACHE part: what to offer
                    then (an engine's cache grows while it compiles); None offers none.
    listen:         address to bind ("host", port 0 picks a free port).
    advertise_host: the host `address` names (default: the bound host); choose it with
                    netloader.endpoint.advertised_host when binding a wildcard.
    secret:         require clients to prove they know it (HMAC); None serves anyone.
    timeouts:       handshake (a new connection's) and stall (silence afterwards).
    limits:         connection and transfer caps, send-rate cap, sender priority.
    tls:            a server context (netloader.transports.tls.server_context).
    """

    def __init__(
        self,
        holdings: Holdings,
        *,
        files: Holdings | None = None,
        compile_cache: Callable[[], Holdings] | None = None,
        listen: Endpoint = LOOPBACK_ANY_PORT,
        advertise_host: str | None = None,
        secret: bytes | None = None,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        limits: Limits = DEFAULT_LIMITS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.holdings = holdings
        self.previous: Holdings | None = None  # a complete earlier version (serve_instead)
        self.checkpoints: dict[str, Manifest] = {}  # version -> its checkpoint's manifest
        self.files = files
        self.compile_cache = compile_cache
        self.timeouts = timeouts
        self.limits = limits
        self._tls = tls
        self._secret = secret
        self._transfers = _Slots(limits.max_transfers)
        self._pacer = Pacer(limits.send_rate)
        self._closing = threading.Event()
        self._draining = threading.Event()
        self._at_close: list[Callable[[], None]] = []
        # Each connection's conversation and the thread running it.
        self._running: dict[Connection, tuple[Conversation, threading.Thread]] = {}
        self._lock = threading.Lock()

        self._listener = socket.create_server(
            (listen.host, listen.port), family=_family(listen.host), reuse_port=False
        )
        self._listener.settimeout(ACCEPT_POLL)
        bound_host, bound_port = self._listener.getsockname()[:2]
        self.address = Endpoint(advertise_host or bound_host, bound_port)
        if secret is None:
            log.warning(
                "netloader: serving on %s without a secret: any peer that reaches this port "
                "can read the weights",
                self.address,
            )
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="netloader-accept", daemon=True
        )
        self._accept_thread.start()
        holdings.prepare()
        if files is not None:
            files.prepare()
        log.info("netloader: serving on %s", self.address)

    # ---- public -------------------------------------------------------------------------
    def manifest(self, timeout: float | None = None) -> Manifest:
        """The served manifest, once its digests are computed (or, at a relay, adopted)."""
        return self.holdings.manifest(timeout if timeout is not None else 1e9)

    def serve_instead(
        self,
        holdings: Holdings,
        files: Holdings | None = None,
        *,
        previous: Holdings | None = None,
    ) -> None:
        """Offer `holdings` (and `files`, when given) to connections from now on;
        connections already open keep what they were offered. `previous`: a complete
        earlier version of the weights (its manifest given) to go on offering beside them
        (see `choose_weights`); None: only `holdings`."""
        holdings.prepare()
        if files is not None:
            self.offer_files(files)
        self.holdings, self.previous = holdings, previous

    def offer_files(self, files: Holdings) -> None:
        """Offer `files` as the model directory's other files from now on."""
        files.prepare()
        self.files = files

    def offer_checkpoints(self, manifests: Mapping[str, Manifest]) -> None:
        """Offer, as the CHECKPOINT part, the manifest of the checkpoint each version of the
        weights it serves was loaded from (version -> manifest), to whoever asks for that
        version: an engine instance loading the weights from this one then knows what it
        holds (its live updates compare with it). Replaces what was offered before."""
        self.checkpoints = dict(manifests)

    def offer_compile_cache(self, compile_cache: Callable[[], Holdings]) -> None:
        """Offer what `compile_cache()` returns, when asked, as the compile cache."""
        self.compile_cache = compile_cache

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._running)

    @property
    def transfers_in_progress(self) -> int:
        """Transfers being served now (what a registry record tells clients choosing the
        least loaded server)."""
        return self._transfers.taken

    def at_close(self, callback: Callable[[], None]) -> None:
        """Call `callback` first thing in `close()`, e.g. to withdraw this server from a
        registry before its listener goes away."""
        self._at_close.append(callback)

    def drain(self, deadline: float) -> bool:
        """Stop gracefully: withdraw from any registry at once, answer new connections and
        new FETCHes with 'unavailable: draining' (clients go to their other sources), let
        the transfers in progress finish for up to `deadline` seconds, then close. Returns
        whether they all finished in time."""
        self.withdraw()
        self._draining.set()
        log.info("netloader: draining %s (up to %.0f s)", self.address, deadline)
        until = time.monotonic() + deadline
        while self._transfers.taken and time.monotonic() < until:
            time.sleep(0.05)
        finished = self._transfers.taken == 0
        if not finished:
            log.warning("netloader: %s closes with transfers still in progress", self.address)
        self.close()
        return finished

    def withdraw(self) -> None:
        """Run the close callbacks now (`at_close`: e.g. leave the registry and any wave
        that lists this server), once; it goes on serving those who know its address."""
        callbacks, self._at_close = self._at_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("netloader: a close callback failed")

    def close(self) -> None:
        """Stop accepting, end every connection, and wait (briefly) for their threads."""
        self.withdraw()
        self._closing.set()
        self._accept_thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            active = list(self._running.items())
        for conn, _ in active:
            conn.abort()
        for _, (_, thread) in active:
            thread.join(timeout=5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- background work ----------------------------------------------------------------
    def _accept_loop(self) -> None:
        lower_this_thread(self.limits.sender_nice)  # conversations' threads inherit it
        while not self._closing.is_set():
            try:
                sock, addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._closing.is_set():
                    return
                log.warning("netloader: accept failed: %s", exc)
                time.sleep(ACCEPT_POLL)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = str(Endpoint(addr[0], addr[1]))
            conn = Connection(sock, peer, p.ServerSession(self._secret, peer))
            if self._draining.is_set():
                conn.try_send(p.Error(p.ErrorCode.UNAVAILABLE, DRAINING), timeout=0.2)
                conn.close()
                continue
            refusal = self._make_room(addr[0])
            if refusal is not None:
                metrics.REFUSALS.labels("busy").inc()
                log.warning("netloader: refused %s: %s", conn.peer, refusal)
                conn.try_send(p.Error(p.ErrorCode.BUSY, refusal), timeout=0.2)
                conn.close()
                continue
            conversation = Conversation(
                conn,
                # One connection, one choice of holdings (see serve_instead).
                functools.partial(choose_weights, current=self.holdings, previous=self.previous),
                files=self.files,
                compile_cache=self.compile_cache,
                checkpoints=self.checkpoints,
                timeouts=self.timeouts,
                transfers=self._transfers,
                max_transfers=self.limits.max_transfers,
                tls=self._tls,
                closing=self._closing,
                draining=self._draining,
                pacer=self._pacer,
            )
            thread = threading.Thread(
                target=self._run, args=(conversation,), name=f"netloader-{peer}", daemon=True
            )
            with self._lock:
                self._running[conn] = (conversation, thread)
            thread.start()

    def _run(self, conversation: Conversation) -> None:
        try:
            conversation.run()
        finally:
            with self._lock:
                self._running.pop(conversation.conn, None)

    def _make_room(self, host: str) -> str | None:
        """None if a new connection from `host` may start, else why it is refused. Where a
        cap is reached, the oldest connection still in its handshake is shed to make room,
        so connections that never finish their handshake cannot lock everyone out."""
        total_cap = self.limits.max_connections
        if not self._room(total_cap, lambda c: True):
            return f"server busy: {total_cap} connections open, the limit"
        peer_cap = self.limits.max_connections_per_peer
        if not self._room(peer_cap, lambda c: c.conn.host == host):
            return f"too many connections from {host} (limit {peer_cap})"
        return None

    def _room(self, cap: int, counted: Callable[[Conversation], bool]) -> bool:
        """Whether fewer than `cap` of the `counted` connections are open, after shedding
        the oldest of them still in its handshake if need be."""
        with self._lock:
            group = [c for c, _ in self._running.values() if counted(c)]
            if len(group) < cap:
                return True
            waiting = [c for c in group if not c.authenticated.is_set()]
            if not waiting:
                return False
            oldest = min(waiting, key=lambda c: c.opened)
            del self._running[oldest.conn]  # its thread ends once the socket is aborted
        log.warning("netloader: shed %s, still in its handshake, to make room", oldest.conn.peer)
        oldest.conn.abort()
        return True


class Relay(Server):
    """A server for a model about to be loaded: listening now, so its address can be handed
    to the instances that start after this one; serving each chunk as soon as the pull it
    observes (`Client.load_into(..., observer=relay.arrivals)`, or `netloader.load(...,
    relay=relay)`) has it verified; and, after `finish`, the loaded model. Takes the same
    keyword arguments as Server."""

    def __init__(self, **options: Unpack[ServerOptions]) -> None:
        self.arrivals = Arrivals()
        super().__init__(self.arrivals, **options)

    def drain(self, deadline: float) -> bool:
        """As Server.drain; a relay still receiving also tells the clients waiting for
        chunks it has not got that none will come, so they move on at once."""
        self.arrivals.fail("the relay is draining (shutting down)")
        return super().drain(deadline)

    def finish(
        self,
        tensors: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        manifest: Manifest | None = None,
        unavailable: str | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        """Serve the loaded model from now on (the pulled tensors, or the same model loaded
        otherwise after a failed pull). `manifest`: digests already computed over these very
        tensors; `unavailable`: tell every client this reason instead; `chunk_bytes`: by
        default the pulled manifest's, so the relay and its upstream can be striped."""
        pulled = self.arrivals.adopted
        if chunk_bytes is None:
            chunk_bytes = DEFAULT_CHUNK_BYTES if pulled is None else pulled.chunk_bytes
        self.serve_instead(
            LoadedTensors(
                tensors,
                identity,
                manifest=manifest,
                unavailable=unavailable,
                chunk_bytes=chunk_bytes,
                column_tiles=1 if pulled is None else pulled.column_tiles,
            )
        )


def choose_weights(version: str, current: Holdings, previous: Holdings | None) -> Holdings:
    """The weights to offer a client that asks for `version` ("": any), of a server
    offering `current` and keeping a complete `previous` version (its manifest given):
    `previous` to a client that asks for its version, and to one that asks for none while
    `current` is not complete (a delta serves only clients updating to it, which say
    which version they take); otherwise `current`, which the client checks as always."""
    if previous is None:
        return current
    if version:
        return previous if previous.manifest(0).identity.version == version else current
    return current if current.complete else previous


class _Slots(threading.BoundedSemaphore):
    """The transfer slots, able to say how many are taken."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self._total = value

    @property
    def taken(self) -> int:
        return self._total - self._value


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
