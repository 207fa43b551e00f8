"""A framed netloader connection over a socket: exact reads straight into memory, kernel
timeouts, and the session (protocol/session.py) deciding which frame may come next."""

from __future__ import annotations

import contextlib
import itertools
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Protocol, TypeVar

from netloader import protocol as p
from netloader.errors import (
    NetloaderError,
    PeerClosed,
    ProtocolError,
    TransferError,
    TransferTimeout,
)

HASHED_PIECE = 128 << 10
IOV_MAX = 1024  # buffers one sendmsg / recvmsg_into takes (Linux)
M = TypeVar("M", bound=p.Message)


class Hasher(Protocol):
    def update(self, data: memoryview) -> None: ...


class Connection:
    """One socket and the session that checks what crosses it. `peer` names the other
    side in every error."""

    def __init__(self, sock: socket.socket, peer: str, session: p.Session) -> None:
        self.sock = sock
        self.peer = peer
        self.host = peer.rpartition(":")[0].strip("[]")
        self.session = session
        self.timeout: float | None = None
        self._deadline: float | None = None  # monotonic; see `within`
        self._deadline_what = ""
        self._deadline_seconds = 0.0
        self._applied: float | None = None  # the timeout the socket has now
        self.declined: dict[str, str] = {}  # transports this connection cannot use, and why

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def abort(self) -> None:
        """Close from another thread: shutdown wakes a thread blocked on this socket."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.close()

    def settimeout(self, seconds: float) -> None:
        """Bound every send and receive by `seconds` of silence. Kept in the kernel
        (SO_RCVTIMEO/SO_SNDTIMEO on a blocking socket) rather than by Python's timeout mode,
        which would add a poll() before each of the many recv calls of a transfer."""
        self.timeout = seconds
        self._apply_timeout(seconds)

    @contextlib.contextmanager
    def within(self, seconds: float, what: str) -> Iterator[None]:
        """Bound everything sent and received inside the block by `seconds` in all, not
        only by silence: a peer that drips a byte now and then is cut off too."""
        self._deadline = time.monotonic() + seconds
        self._deadline_what, self._deadline_seconds = what, seconds
        try:
            yield
        finally:
            self._deadline = None
            if self.timeout is not None:
                self._apply_timeout(self.timeout)

    def _before_io(self) -> None:
        """Under a deadline: fail once it has passed, else wait at most until it."""
        if self._deadline is None:
            return
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout(
                f"{self.peer}: {self._deadline_what} took longer than {self._deadline_seconds:g} s",
                source=self.peer,
            )
        if self.timeout is None or remaining < self.timeout:
            self._apply_timeout(remaining)
        elif self._applied != self.timeout:
            self._apply_timeout(self.timeout)

    def _apply_timeout(self, seconds: float) -> None:
        if seconds == self._applied:
            return
        self._applied = seconds
        if isinstance(self.sock, ssl.SSLSocket):
            # OpenSSL would retry a read that SO_RCVTIMEO interrupted, forever: use
            # Python's timeout mode on TLS sockets (its poll() is small beside the crypto).
            self.sock.settimeout(seconds)
            return
        whole = int(seconds)
        value = struct.pack("ll", whole, int((seconds - whole) * 1e6))
        self.sock.settimeout(None)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)

    # ---- sending ------------------------------------------------------------------------
    def send(self, message: p.Message) -> None:
        self.send_bytes(self.session.send(message))

    def send_data(self, chunk: int, views: Sequence[memoryview]) -> None:
        """A DATA frame of chunk `chunk`: its pieces' bytes, gathered by the kernel
        (sendmsg, IOV_MAX pieces a call) where the socket is plain."""
        length = sum(len(v) for v in views)
        self.send_bytes(self.session.send_data_header(chunk, length))
        if len(views) == 1 or isinstance(self.sock, ssl.SSLSocket):
            for view in views:
                self.send_bytes(view)
            return
        pending = deque(v for v in views if len(v))
        with self._sending():
            while pending:
                self._before_io()
                _consume(pending, self.sock.sendmsg(list(itertools.islice(pending, IOV_MAX))))

    def send_bytes(self, data: bytes | memoryview) -> None:
        """Raw bytes, already accounted for by the session (a frame it produced)."""
        with self._sending():
            if self._deadline is None:
                self.sock.sendall(data)
                return
            view, sent = memoryview(data).cast("B"), 0
            while sent < len(view):
                self._before_io()
                sent += self.sock.send(view[sent:])

    @contextlib.contextmanager
    def _sending(self) -> Iterator[None]:
        """Socket errors while sending, as the peer's failure."""
        try:
            yield
        except (TimeoutError, BlockingIOError) as exc:
            if self._deadline is not None:
                self._before_io()  # says "took longer than" once the deadline is the cause
            raise TransferTimeout(f"{self.peer} stopped reading", source=self.peer) from exc
        except OSError as exc:
            if isinstance(exc, TransferError):
                raise
            raise PeerClosed(f"connection to {self.peer} lost: {exc}", source=self.peer) from exc

    def try_send(self, message: p.Message, timeout: float = 1.0) -> None:
        """Best effort (a parting ERROR or BYE): failures are ignored."""
        with contextlib.suppress(NetloaderError, OSError):
            self.settimeout(timeout)
            self.send(message)

    # ---- receiving ----------------------------------------------------------------------
    def recv_into(self, view: memoryview, hasher: Hasher | None = None) -> None:
        """Fill `view` exactly, straight from the socket. With `hasher`, feed it each piece
        as it lands, while the bytes are still in cache: verification without a second
        pass over memory (pieces are capped so they fit in L2)."""
        got, size = 0, len(view)
        piece = HASHED_PIECE if hasher is not None else size
        with self._receiving():
            while got < size:
                self._before_io()
                n = self.sock.recv_into(view[got : got + piece])
                if hasher is not None:
                    hasher.update(view[got : got + n])
                if n == 0:
                    raise PeerClosed(
                        f"{self.peer} closed the connection ({got} of {size} bytes read)",
                        source=self.peer,
                    )
                got += n

    def recv_views(self, views: Sequence[memoryview], hasher: Hasher) -> None:
        """Fill each of `views` exactly, in order, feeding `hasher` as they land. Runs of
        small views are read by one recvmsg_into each (a cache-sized run), so many small
        pieces cost few system calls."""
        plain = not isinstance(self.sock, ssl.SSLSocket)
        i = 0
        while i < len(views):
            if len(views[i]) >= HASHED_PIECE or not plain:
                self.recv_into(views[i], hasher)
                i += 1
                continue
            j, size = i, 0
            while j < len(views) and j - i < IOV_MAX and size + len(views[j]) <= HASHED_PIECE:
                size += len(views[j])
                j += 1
            self._recv_scattered(views[i:j], size)
            for view in views[i:j]:
                hasher.update(view)
            i = j

    def _recv_scattered(self, views: Sequence[memoryview], size: int) -> None:
        pending = deque(v for v in views if len(v))
        got = 0
        with self._receiving():
            while pending:
                self._before_io()
                n = self.sock.recvmsg_into(pending)[0]
                if n == 0:
                    raise PeerClosed(
                        f"{self.peer} closed the connection ({got} of {size} bytes read)",
                        source=self.peer,
                    )
                got += n
                _consume(pending, n)

    @contextlib.contextmanager
    def _receiving(self) -> Iterator[None]:
        """Socket errors while receiving, as the peer's failure."""
        try:
            yield
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO expired
            if self._deadline is not None:
                self._before_io()
            raise TransferTimeout(
                f"{self.peer} sent nothing for {self.timeout} s", source=self.peer
            ) from exc
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, TransferError):
                raise
            raise PeerClosed(f"connection to {self.peer} lost: {exc}", source=self.peer) from exc

    def recv_exact(self, size: int) -> bytes:
        buf = bytearray(size)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def recv_header(self) -> p.FrameHeader:
        """The next frame's header, refused unless the session allows it now."""
        header = p.decode_header(self.recv_exact(p.HEADER.size))
        self.session.check_header(header)
        return header

    def message_from(self, header: p.FrameHeader) -> p.Message:
        """The body of a control frame whose header was read; an ERROR becomes the
        exception its code maps to."""
        if header.type is p.MsgType.DATA:
            raise ProtocolError(f"{self.peer} sent tensor data where a control message belongs")
        message = self.session.receive_body(header, self.recv_exact(header.length))
        if isinstance(message, p.Error):
            raise message.exception(self.peer)
        return message

    def receive(self) -> p.Message:
        """The next control message (whichever the phase allows)."""
        return self.message_from(self.recv_header())

    def expect(self, kind: type[M]) -> M:
        """The next control message, which must be a `kind`."""
        message = self.receive()
        if not isinstance(message, kind):
            raise ProtocolError(f"{self.peer} sent {message.TYPE.name}, expected {kind.TYPE.name}")
        return message


def _consume(pending: deque[memoryview], done: int) -> None:
    """Drop the first `done` bytes of the buffers in `pending` (a partial send or receive)."""
    while done:
        first = pending[0]
        if done < len(first):
            pending[0] = first[done:]
            return
        done -= len(first)
        pending.popleft()


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
