"""Client and server on one host: the client copies each chunk straight out of the
server's memory with process_vm_readv (one kernel copy, made by the client's CPU, so the
server spends nothing on it), then verifies it against the manifest's digest.

Chosen over shared memory because weights already live in ordinary process memory: a
shared segment would need the server to copy them in first (a second copy, on the server's
CPU). The README's benchmark shows the figures.

Per FETCH, on the control connection:

    client: FETCH "same-host"
    server: SAME_HOST_OFFER {boot id, the client's address as the server sees it,
            an abstract Unix socket, a token also held at a probe address}
    client: connects to the socket and sends the token: the kernel tells each side the
            other's pid (SO_PEERCRED); the server lets that pid read it (Yama, if needed);
            the client reads the probe. Then SAME_HOST_ACCEPT, or SAME_HOST_DECLINE{why},
            after which the chunks come as DATA frames (the tcp transport).
    server: CHUNK_ADDRESS {chunk, its pieces' addresses} per chunk, END
    client: reads and verifies every chunk (one process_vm_readv for all its pieces),
            DONE (the server's grant ends there)

Being on one host is proved three ways: the same boot id, the same TCP four-tuple seen
from both ends (so no proxy or NAT sits between them), and a successful read of the token.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import select
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from netloader import protocol as p
from netloader.errors import PeerClosed, ProtocolError, SourceUnavailable, TransferError
from netloader.manifest import MAX_PIECES, Chunk
from netloader.settings import Timeouts
from netloader.tensors import address_of
from netloader.transports import process_memory
from netloader.transports.addresses import expect_addresses, send_addresses
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.connection import Connection
from netloader.transports.tcp import TCP

log = logging.getLogger(__name__)

# Reading threads per connection: one reads while another hashes; more than the cores a
# small host has would only contend for memory bandwidth.
READERS = max(1, min(4, os.cpu_count() or 1))
WINDOW = 2 * READERS  # chunks being read at once
TOKEN_BYTES = 32  # the offer carries it as a nonce-sized field


def address_text(address: Any) -> str:
    """'host:port' of a socket address, IPv4-mapped IPv6 written as IPv4."""
    host, port = address[0], address[1]
    if host.startswith("::ffff:"):
        host = host[len("::ffff:") :]
    return f"{host}:{port}"


class Declinable(Transport):
    """A transport whose offer the client may decline (`decline`); with `fallback`, a
    connection where it was declined asks for tcp from then on, else the source fails
    with the reason (the transport forced)."""

    def __init__(self, fallback: bool) -> None:
        self.fallback = fallback

    def for_connection(self, conn: Connection, sink: ChunkSink | None = None) -> Transport:
        if self.fallback and self.name in conn.declined:
            return TCP
        return self


class SameHostTransport(Declinable):
    """Reads chunks from the server's memory when both ends are on one host.

    fallback: when the client cannot read the server's memory, take the chunks as DATA
              frames on the same connection (logged once per connection); without it the
              source fails with the reason (TRANSPORT=same-host forces the path).
    """

    name = "same-host"
    tls = True  # the bytes never touch a network; the digests they are checked
    # against and the token came over the (TLS-covered) control connection
    memory = frozenset({"cpu"})

    # ---- server -------------------------------------------------------------------------
    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        token = secrets.token_bytes(TOKEN_BYTES)
        probe = bytearray(token)  # the client reads it to prove it may read us (a local:
        # alive until this returns)
        probe_address = address_of(probe)
        with _listener() as (listener, name):
            conn.send(
                p.SameHostOffer(
                    process_memory.boot_id() or "",
                    address_text(conn.sock.getpeername()),
                    name,
                    token,
                    probe_address,
                )
            )
            attached = _accept_reader(conn, listener, token, timeouts.handshake)
        with contextlib.ExitStack() as grant:
            if attached is not None:
                sock, pid = grant.enter_context(attached[0]), attached[1]
                _grant(conn, sock, pid, grant)
            if sent_over_tcp_if_declined(conn, source, chunks, timeouts):
                return
            if attached is None:
                raise ProtocolError(f"{conn.peer} accepted the same-host path without attaching")
            send_addresses(conn, source, chunks, timeouts)

    # ---- client -------------------------------------------------------------------------
    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        offer = conn.expect(p.SameHostOffer)
        try:
            pid, attachment = _attach(conn, offer, timeouts.handshake)
        except SourceUnavailable as exc:
            if not self.fallback:
                raise
            decline(conn, self.name, "same-host path", str(exc), chunks, sink, timeouts)
            return
        with attachment:
            conn.send(p.SameHostAccept())
            _read_all(conn, pid, chunks, sink, timeouts)
        conn.send(p.Done())


def sent_over_tcp_if_declined(
    conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
) -> bool:
    """Server: read the client's answer to an offer; if it declined, send the chunks as
    DATA frames (tcp) and say so (True); False if it accepted."""
    answer = conn.receive()
    if isinstance(answer, p.SameHostDecline):
        log.info("netloader: %s takes tcp: %s", conn.peer, answer.reason)
        TCP.send_chunks(conn, source, chunks, timeouts)
        return True
    if not isinstance(answer, p.SameHostAccept):
        raise ProtocolError(f"{conn.peer} answered an offer with {answer.TYPE.name}")
    return False


def decline(
    conn: Connection,
    name: str,
    what: str,
    why: str,
    chunks: ChunkList,
    sink: ChunkSink,
    timeouts: Timeouts,
) -> None:
    """Client: decline the offer of transport `name` (`what`, for the log) because of
    `why`, and take the chunks as DATA frames instead; logged once per connection (later
    FETCHes on it ask for tcp: `for_connection`)."""
    reason = why.removeprefix(f"{conn.peer}: ")
    conn.send(p.SameHostDecline(reason))
    if name not in conn.declined:
        log.warning("netloader: %s: %s refused (%s); using tcp", conn.peer, what, reason)
    conn.declined[name] = reason
    TCP.receive_chunks(conn, chunks, sink, timeouts)


@contextlib.contextmanager
def _listener() -> Any:
    """A fresh abstract Unix socket (Linux: no file, gone when closed), listening."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    name = f"netloader-{secrets.token_hex(16)}"
    try:
        sock.bind("\0" + name)
        sock.listen(1)
        yield sock, name
    finally:
        sock.close()


def _accept_reader(
    conn: Connection, listener: socket.socket, token: bytes, timeout: float
) -> tuple[socket.socket, int] | None:
    """Wait for the client to attach (or to answer without attaching): the attached socket
    and the attaching process's pid once its token matched, else None."""
    if not _readable_first(listener, conn.sock, timeout):
        return None
    listener.settimeout(timeout)
    try:
        attached, _ = listener.accept()
    except OSError:
        return None
    try:
        attached.settimeout(timeout)
        if hmac.compare_digest(_recv_exact(attached, TOKEN_BYTES), token):
            return attached, process_memory.peer_pid(attached)
        log.warning("netloader: a process attached for %s with a wrong token", conn.peer)
    except OSError:
        pass
    attached.close()
    return None


def _grant(
    conn: Connection, attached: socket.socket, pid: int, stack: contextlib.ExitStack
) -> None:
    """Let `pid` read this process (for as long as `stack` is open) and tell it so; under
    Yama an unauthenticated peer is not handed that."""
    allowed = conn.session.keyed or process_memory.yama_scope() != 1
    if allowed:
        try:
            stack.enter_context(process_memory.reader_allowed(pid))
        except OSError as exc:
            log.warning("netloader: cannot let %s read this process: %s", conn.peer, exc)
            allowed = False
    with contextlib.suppress(OSError):
        attached.sendall(b"\x01" if allowed else b"\x00")


def _readable_first(listener: socket.socket, control: socket.socket, timeout: float) -> bool:
    """Whether the client attached before saying anything more on the control connection."""
    if isinstance(control, ssl.SSLSocket) and control.pending():
        return False
    readable, _, _ = select.select([listener, control], [], [], timeout)
    return listener in readable


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            raise OSError("closed")
        data += piece
    return data


def host_refusal(conn: Connection, boot_id: str, peer: str) -> str | None:
    """Why a server that says it runs on the host `boot_id` and sees this end of `conn` as
    `peer` is not proven to be on this host and directly connected; None if it is (the
    caller's test read then proves it is that server)."""
    here_boot = process_memory.boot_id()
    if here_boot is None:
        return f"{process_memory.BOOT_ID} is not readable"
    if boot_id != here_boot:
        return "the server runs on another host (boot id differs)"
    here = address_text(conn.sock.getsockname())
    if peer != here:
        return f"not a direct connection (the server sees {peer}, this end is {here})"
    return None


def _attach(conn: Connection, offer: p.SameHostOffer, timeout: float) -> tuple[int, Any]:
    """Check that the offer can be taken from here, attach and read the probe: the server's
    pid, and the attachment to hold open while reading. SourceUnavailable says why not."""

    def refuse(reason: str) -> SourceUnavailable:
        return SourceUnavailable(f"{conn.peer}: {reason}", source=conn.peer)

    why_not = process_memory.unsupported() or host_refusal(conn, offer.boot_id, offer.peer)
    if why_not is not None:
        raise refuse(why_not)
    attachment = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        attachment.settimeout(timeout)
        attachment.connect("\0" + offer.socket)
        attachment.sendall(offer.token)
        granted = _recv_exact(attachment, 1)
        pid = process_memory.peer_pid(attachment)
    except OSError as exc:
        attachment.close()
        raise refuse(f"cannot attach to the server's socket: {exc}") from exc
    try:
        if granted != b"\x01":
            raise refuse("the server grants memory access to authenticated clients only (Yama)")
        if pid <= 0:
            raise refuse("the server's process is not visible here (another pid namespace)")
        probe = bytearray(TOKEN_BYTES)
        try:
            process_memory.read(pid, address_of(probe), offer.probe, TOKEN_BYTES)
        except OSError as exc:
            raise refuse(f"cannot read the server's memory: {exc.strerror}") from exc
        if not hmac.compare_digest(bytes(probe), offer.token):
            raise refuse(f"process {pid} is not the server that made the offer")
    except BaseException:
        attachment.close()
        raise
    return pid, attachment


def _read_all(
    conn: Connection, pid: int, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
) -> None:
    """Read every chunk the server names, several at once, each verified by the sink."""
    pending: deque[Future[None]] = deque()
    pool = ThreadPoolExecutor(READERS, thread_name_prefix="netloader-read")
    try:
        for chunk in chunks:
            addresses = expect_addresses(conn, chunk, timeouts)
            pending.append(pool.submit(_read_one, pid, addresses, chunk, sink, conn.peer))
            if len(pending) >= WINDOW:
                pending.popleft().result()
        conn.expect(p.End)
        while pending:
            pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _read_one(pid: int, addresses: Sequence[int], chunk: Chunk, sink: ChunkSink, peer: str) -> None:
    """Copy one chunk's pieces in one system call, then let the sink hash them. (Hashing
    1 MiB pieces as they land, in cache, measured no faster: the process_vm_readv rows of
    benchmarks/bench_core.py.)"""
    landing = sink.landing(chunk)
    if chunk.length:
        here, there = landing.addresses, addresses
        lengths = [p.length for p in chunk.pieces]
        if chunk.strided:  # a column tile: a run per row
            runs = chunk.pieces[0].runs(here[0], there[0])
            here, there, lengths = ([run[i] for run in runs] for i in range(3))
        try:
            for first in range(0, len(lengths), MAX_PIECES):  # IOV_MAX iovecs a call
                end = first + MAX_PIECES
                process_memory.read_pieces(
                    pid, here[first:end], there[first:end], lengths[first:end]
                )
        except OSError as exc:
            if not _alive(pid):
                raise PeerClosed(f"{peer}: the server's process ended", source=peer) from exc
            raise TransferError(
                f"{peer}: chunk {chunk.number} at {addresses[0]:#x}: {exc.strerror}", source=peer
            ) from exc
    sink.received(chunk, source=peer)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


SAME_HOST = SameHostTransport(fallback=False)  # TRANSPORT=same-host: this path or nothing
AUTO = SameHostTransport(fallback=True)  # TRANSPORT=auto: this path where it can, else tcp
