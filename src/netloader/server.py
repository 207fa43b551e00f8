"""The serving side: background threads that hand out a model's tensors, verified by
digest, to any number of clients at once, without disturbing the host process."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
import time
from pathlib import Path

import torch

from netloader import protocol as p
from netloader.connection import Connection
from netloader.endpoint import Endpoint
from netloader.errors import NetloaderError, ProtocolError, SourceUnavailable
from netloader.holdings import Holdings
from netloader.manifest import PROTOCOL_VERSION, Chunk, Manifest
from netloader.tensors import flat_bytes
from netloader.transports import process_group, tcp

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
ACCEPT_POLL = 0.2
LOOPBACK_ANY_PORT = Endpoint("127.0.0.1", 0)
# Each connection is a thread: caps keep a flood of connections (or one greedy peer)
# from growing the server without bound or starving other peers.
MAX_CONNECTIONS = 128
MAX_CONNECTIONS_PER_PEER = 16
# Transfers in progress at once: each streams at link speed, so more would only share it.
MAX_TRANSFERS = 32
ANSWER_WITHIN = 0.8


class _HeldChunks:
    """ChunkSource over a server's holdings: views into the tensors' memory, no copies for
    contiguous CPU tensors (others are made contiguous on the host, one tensor at a time).
    Waits, at most `wait` seconds, for chunks a relay has not received yet."""

    def __init__(self, holdings: Holdings, wait: float) -> None:
        self.holdings = holdings
        self.tensors = holdings.tensors()
        self.wait = wait
        self._last: tuple[int, torch.Tensor] | None = None

    def chunk_bytes(self, chunk: Chunk) -> torch.Tensor:
        self.holdings.wait_for(chunk, self.wait)
        if self._last is None or self._last[0] != chunk.tensor:
            self._last = (chunk.tensor, flat_bytes(self.tensors[chunk.tensor]).cpu())
        return self._last[1][chunk.offset : chunk.offset + chunk.length]


class Server:
    """Serves `holdings` (a loaded model, or one still arriving at a relay) on `listen`
    ("host:port"; port 0 picks a free one). Construction binds the listener and returns at
    once; everything else happens in background threads. Call `close()` to stop.
    """

    def __init__(
        self,
        holdings: Holdings,
        *,
        listen: Endpoint = LOOPBACK_ANY_PORT,
        advertise_host: str | None = None,
        secret: bytes | None = None,
        stall_timeout: float = 10.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        output_file: Path | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
        max_transfers: int = MAX_TRANSFERS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: a server context (netloader.tls.server_context) to require TLS."""
        self.holdings = holdings
        self._tls = tls
        self._max_connections = max_connections
        self._max_per_peer = max_connections_per_peer
        self._transfers = threading.BoundedSemaphore(max_transfers)
        self._max_transfers = max_transfers
        self._secret = secret
        self._stall_timeout = stall_timeout
        self._handshake_timeout = handshake_timeout
        self._closing = threading.Event()
        self._connections: dict[Connection, threading.Thread] = {}
        self._lock = threading.Lock()

        self._listener = socket.create_server(
            (listen.host, listen.port), family=_family(listen.host), reuse_port=False
        )
        self._listener.settimeout(ACCEPT_POLL)
        bound_host, bound_port = self._listener.getsockname()[:2]
        host = advertise_host or _advertised_host(bound_host)
        self.address = Endpoint(host, bound_port)
        if output_file is not None:
            _write_atomically(output_file, f"{self.address}\n")
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
        log.info("netloader: serving on %s", self.address)

    # ---- public -------------------------------------------------------------------------
    def manifest(self, timeout: float | None = None) -> Manifest:
        """The served manifest, once its digests are computed (or, at a relay, adopted)."""
        return self.holdings.manifest(timeout if timeout is not None else 1e9)

    def serve_instead(self, holdings: Holdings) -> None:
        """Offer `holdings` to connections from now on (a relay whose own model is now
        loaded and checked); connections already open keep what they were offered."""
        self.holdings = holdings

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def close(self) -> None:
        """Stop accepting, end every connection, and wait (briefly) for their threads."""
        self._closing.set()
        self._accept_thread.join(timeout=5)
        self._listener.close()
        with self._lock:
            active = dict(self._connections)
        for conn in active:
            conn.abort()
        for thread in active.values():
            thread.join(timeout=5)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- background work ----------------------------------------------------------------
    def _accept_loop(self) -> None:
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
            conn = Connection(sock, str(Endpoint(addr[0], addr[1])))
            refusal = self._over_limit(addr[0])
            if refusal is not None:
                log.warning("netloader: refused %s: %s", conn.peer, refusal)
                _try_send(conn, p.error("busy", refusal), timeout=0.2)
                conn.close()
                continue
            thread = threading.Thread(
                target=self._serve_connection,
                args=(conn,),
                name=f"netloader-{conn.peer}",
                daemon=True,
            )
            with self._lock:
                self._connections[conn] = thread
            thread.start()

    def _over_limit(self, host: str) -> str | None:
        with self._lock:
            total = len(self._connections)
            from_peer = sum(1 for c in self._connections if c.host == host)
        if total >= self._max_connections:
            return f"server busy: {total} connections open (limit {self._max_connections})"
        if from_peer >= self._max_per_peer:
            return f"too many connections from {host} (limit {self._max_per_peer})"
        return None

    def _serve_connection(self, conn: Connection) -> None:
        try:
            self._converse(conn)
        except SourceUnavailable as exc:  # nothing (more) to offer this client: say why
            log.info("netloader: told %s: %s", conn.peer, exc)
            _try_send(conn, p.error("unavailable", str(exc)))
        except (NetloaderError, OSError) as exc:
            level = logging.DEBUG if self._closing.is_set() else logging.WARNING
            log.log(level, "netloader: connection from %s ended: %s", conn.peer, exc)
            if isinstance(exc, ProtocolError):
                _try_send(conn, p.error("bad_request", str(exc)))
        except Exception:  # a bug in one connection must never reach the host process
            log.exception("netloader: connection from %s failed", conn.peer)
            _try_send(conn, p.error("internal", "internal server error"))
        finally:
            conn.close()
            with self._lock:
                self._connections.pop(conn, None)

    def _converse(self, conn: Connection) -> None:
        conn.settimeout(self._handshake_timeout)
        if self._tls is not None:
            conn.sock.settimeout(self._handshake_timeout)  # see Connection.settimeout
            try:
                conn.sock = self._tls.wrap_socket(conn.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                raise ProtocolError(f"TLS handshake failed (a client without TLS?): {exc}") from exc
            conn.settimeout(self._handshake_timeout)
        _, body = conn.recv_message(p.MsgType.HELLO)
        hello = p.Hello.decode(body)
        if hello.protocol != PROTOCOL_VERSION:
            conn.send(
                p.error(
                    "version", f"server speaks protocol {PROTOCOL_VERSION}, client {hello.protocol}"
                )
            )
            log.warning("netloader: %s speaks protocol %d; refused", conn.peer, hello.protocol)
            return
        nonce = p.new_nonce()
        server_proof = (
            None if self._secret is None else p.proof(self._secret, "server", hello.nonce, nonce)
        )
        conn.send(
            p.Welcome(PROTOCOL_VERSION, self._secret is not None, nonce, server_proof).encode()
        )
        if self._secret is not None:
            _, body = conn.recv_message(p.MsgType.AUTH)
            if not p.proof_matches(self._secret, "client", nonce, hello.nonce, body.get("proof")):
                conn.send(p.error("auth", "authentication failed"))
                log.warning("netloader: %s failed authentication", conn.peer)
                return
        conn.settimeout(self._stall_timeout)
        # Answer waits before the client's own stall timeout would give up on us.
        answer_within = ANSWER_WITHIN * self._stall_timeout
        holdings = self.holdings  # one connection, one set of holdings (see serve_instead)
        manifest = holdings.manifest(answer_within)
        while True:
            kind, body = conn.recv_message(p.MsgType.GET_MANIFEST, p.MsgType.FETCH, p.MsgType.BYE)
            if kind is p.MsgType.BYE:
                return
            if kind is p.MsgType.GET_MANIFEST:
                conn.send(p.manifest_message(manifest))
                continue
            fetch = p.Fetch.decode(body, manifest)
            if self._tls is not None and fetch.transport != tcp.NAME:
                raise ProtocolError(f"this server uses TLS: transport {fetch.transport!r} refused")
            if not self._transfers.acquire(blocking=False):
                raise SourceUnavailable(
                    f"server busy: {self._max_transfers} transfers in progress (limit)"
                )
            try:
                self._send(conn, manifest, fetch, _HeldChunks(holdings, answer_within))
            finally:
                self._transfers.release()

    def _send(
        self, conn: Connection, manifest: Manifest, fetch: p.Fetch, source: _HeldChunks
    ) -> None:
        chunks = [manifest.chunk(t, c) for t, c in fetch.chunks]
        started = time.perf_counter()
        if fetch.transport == tcp.NAME:
            tcp.send_chunks(conn, source, chunks)
        elif fetch.transport in ("gloo", "nccl"):
            process_group.send_chunks(
                conn, source, chunks, backend=fetch.transport, timeout=self._stall_timeout
            )
        else:
            raise ProtocolError(f"unknown transport {fetch.transport!r}")
        seconds = time.perf_counter() - started
        sent = sum(c.length for c in chunks)
        log.info(
            "netloader: sent %d chunks, %d bytes to %s over %s in %.3f s (%.2f GB/s)",
            len(chunks),
            sent,
            conn.peer,
            fetch.transport,
            seconds,
            sent / max(seconds, 1e-9) / 1e9,
        )


def _try_send(conn: Connection, data: bytes, timeout: float = 1.0) -> None:
    try:
        conn.settimeout(timeout)
        conn.send(data)
    except (NetloaderError, OSError):
        pass


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _advertised_host(bound: str) -> str:
    """A bound wildcard address is not reachable; advertise the host's address instead."""
    if bound not in ("0.0.0.0", "::"):
        return bound
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
