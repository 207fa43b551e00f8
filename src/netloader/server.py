"""The serving side: background threads that hand out a model's tensors, verified by
digest, to any number of clients at once, without disturbing the host process."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from netloader import protocol as p
from netloader.connection import Connection
from netloader.endpoint import Endpoint
from netloader.errors import NetloaderError, ProtocolError
from netloader.manifest import (
    DEFAULT_CHUNK_BYTES,
    PROTOCOL_VERSION,
    Chunk,
    Identity,
    Manifest,
    build_manifest,
)
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


class _TensorChunks:
    """ChunkSource over the served tensors: views into their memory, no copies for
    contiguous CPU tensors (others are made contiguous on the host, one tensor at a time)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors
        self._last: tuple[int, torch.Tensor] | None = None

    def chunk_bytes(self, chunk: Chunk) -> torch.Tensor:
        if self._last is None or self._last[0] != chunk.tensor:
            self._last = (chunk.tensor, flat_bytes(self.tensors[chunk.tensor]).cpu())
        return self._last[1][chunk.offset : chunk.offset + chunk.length]


class Server:
    """Serves `tensors` under `identity` on `listen` ("host:port"; port 0 picks a free one).

    Construction binds the listener and returns at once; digests are computed in a
    background thread and clients wait for them, unless `manifest` (built from these very
    tensors) is given. With `unavailable`, the server answers every authenticated client
    with that reason instead of a manifest. Call `close()` to stop.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        listen: Endpoint = LOOPBACK_ANY_PORT,
        advertise_host: str | None = None,
        secret: bytes | None = None,
        stall_timeout: float = 10.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        output_file: Path | None = None,
        manifest: Manifest | None = None,
        unavailable: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_connections_per_peer: int = MAX_CONNECTIONS_PER_PEER,
    ) -> None:
        self._tensors = dict(tensors)
        self._max_connections = max_connections
        self._max_per_peer = max_connections_per_peer
        self._unavailable = unavailable
        self._identity = identity
        self._secret = secret
        self._stall_timeout = stall_timeout
        self._chunk_bytes = chunk_bytes
        self._manifest = manifest
        self._manifest_ready = threading.Event()
        self._manifest_error: BaseException | None = None
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
                "netloader: serving %s on %s without a secret: any peer that reaches this port "
                "can read the weights",
                identity.model,
                self.address,
            )
        # The digest thread is not joined on close: it is finite and holds no socket.
        if manifest is None:
            threading.Thread(
                target=self._build_manifest, name="netloader-digest", daemon=True
            ).start()
        else:
            self._manifest_ready.set()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name="netloader-accept", daemon=True
        )
        self._accept_thread.start()
        log.info(
            "netloader: serving %s (%d tensors) on %s", identity.model, len(tensors), self.address
        )

    # ---- public -------------------------------------------------------------------------
    def manifest(self, timeout: float | None = None) -> Manifest:
        """The served manifest, once its digests are computed."""
        if not self._manifest_ready.wait(timeout):
            raise TimeoutError("manifest digests are still being computed")
        if self._manifest is None:
            raise NetloaderError(f"cannot serve: {self._manifest_error}")
        return self._manifest

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
    def _build_manifest(self) -> None:
        try:
            started = time.perf_counter()
            self._manifest = build_manifest(self._identity, self._tensors, self._chunk_bytes)
            log.debug(
                "netloader: digests of %d bytes in %.2f s",
                self._manifest.total_bytes,
                time.perf_counter() - started,
            )
        except BaseException as exc:  # reported to every client; never kills the host
            self._manifest_error = exc
            log.error("netloader: cannot build the manifest: %s", exc)
        finally:
            self._manifest_ready.set()

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
        conn.settimeout(HANDSHAKE_TIMEOUT)
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
        if self._unavailable is not None:
            conn.send(p.error("unavailable", self._unavailable))
            return
        while True:
            kind, body = conn.recv_message(p.MsgType.GET_MANIFEST, p.MsgType.FETCH, p.MsgType.BYE)
            if kind is p.MsgType.BYE:
                return
            self._manifest_ready.wait()
            if self._manifest is None:
                conn.send(p.error("unavailable", f"cannot serve: {self._manifest_error}"))
                return
            manifest = self._manifest
            if kind is p.MsgType.GET_MANIFEST:
                conn.send(p.manifest_message(manifest))
                continue
            self._send(conn, manifest, p.Fetch.decode(body, manifest))

    def _send(self, conn: Connection, manifest: Manifest, fetch: p.Fetch) -> None:
        chunks = [manifest.chunk(t, c) for t, c in fetch.chunks]
        source = _TensorChunks(list(self._tensors.values()))
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
