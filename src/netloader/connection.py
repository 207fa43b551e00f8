"""A framed netloader connection over a socket: exact reads, timeouts, error mapping."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
from typing import Any, Protocol

from netloader import protocol as p
from netloader.errors import (
    AuthenticationError,
    PeerClosed,
    ProtocolError,
    SourceUnavailable,
    TransferError,
    TransferTimeout,
    VersionMismatch,
)

HASHED_PIECE = 128 << 10


class Hasher(Protocol):
    def update(self, data: memoryview) -> None: ...


_REMOTE_ERRORS: dict[str, type[TransferError]] = {
    "version": VersionMismatch,
    "auth": AuthenticationError,
    "unavailable": SourceUnavailable,
    "busy": SourceUnavailable,
}


class RemoteError(TransferError):
    """The peer answered with an ERROR frame."""


class Connection:
    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.host = peer.rpartition(":")[0].strip("[]")
        self.timeout: float | None = None

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
    def send(self, data: bytes | memoryview) -> None:
        try:
            self.sock.sendall(data)
        except (TimeoutError, BlockingIOError) as exc:
            raise TransferTimeout(f"{self.peer} stopped reading", source=self.peer) from exc
        except OSError as exc:
            raise PeerClosed(f"connection to {self.peer} lost: {exc}", source=self.peer) from exc

    # ---- receiving ----------------------------------------------------------------------
    def recv_into(self, view: memoryview, hasher: Hasher | None = None) -> None:
        """Fill `view` exactly, straight from the socket. With `hasher`, feed it each piece
        as it lands, while the bytes are still in cache: verification without a second
        pass over memory (pieces are capped so they fit in L2)."""
        got, size = 0, len(view)
        piece = HASHED_PIECE if hasher is not None else size
        try:
            while got < size:
                n = self.sock.recv_into(view[got : got + piece])
                if hasher is not None:
                    hasher.update(view[got : got + n])
                if n == 0:
                    raise PeerClosed(
                        f"{self.peer} closed the connection ({got} of {size} bytes read)",
                        source=self.peer,
                    )
                got += n
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO expired
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
        return p.decode_header(self.recv_exact(p.HEADER.size))

    def recv_message(self, *expected: p.MsgType) -> tuple[p.MsgType, dict[str, Any]]:
        """Read one control frame; an ERROR frame becomes an exception."""
        return self.message_from(self.recv_header(), *expected)

    def message_from(
        self, header: p.FrameHeader, *expected: p.MsgType
    ) -> tuple[p.MsgType, dict[str, Any]]:
        """Read the body of a control frame whose header was read already."""
        if header.type is p.MsgType.DATA:
            raise ProtocolError(f"{self.peer} sent tensor data where a control message belongs")
        body = p.decode_body(self.recv_exact(header.length))
        if header.type is p.MsgType.ERROR and p.MsgType.ERROR not in expected:
            code, message = p.describe_error(body)
            raise _REMOTE_ERRORS.get(code, RemoteError)(
                f"{self.peer} refused: {message}", source=self.peer
            )
        if header.type not in expected:
            names = "/".join(t.name for t in expected)
            raise ProtocolError(f"{self.peer} sent {header.type.name}, expected {names}")
        return header.type, body


def connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
