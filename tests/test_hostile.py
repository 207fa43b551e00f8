"""Garbage, truncated and oversized messages on the server port: each is refused and the
server goes on serving the next real client."""

from __future__ import annotations

import socket
import struct

import pytest
from tensorsets import empty_like_set, model_like, same_bytes

from netloader import Client, Identity
from netloader import protocol as p
from netloader.manifest import PROTOCOL_VERSION

HELLO = p.Hello(PROTOCOL_VERSION, p.new_nonce()).encode()


def _frame(kind: int, body: bytes, length: int | None = None) -> bytes:
    return struct.pack("!4sB3xQ", b"NLDR", kind, len(body) if length is None else length) + body


PAYLOADS = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random": bytes(range(256)) * 4,
    "truncated header": HELLO[:7],
    "truncated body": HELLO[:-5],
    "claims 1 TB body": _frame(p.MsgType.HELLO, b"{}", length=1 << 40),
    "unknown type": _frame(99, b"{}"),
    "json array": _frame(p.MsgType.HELLO, b"[1,2]"),
    "bad utf8": _frame(p.MsgType.HELLO, b"\xff\xfe{"),
    "deep json": _frame(p.MsgType.HELLO, b"[" * 50000 + b"]" * 50000),
    "hello without nonce": _frame(p.MsgType.HELLO, b'{"protocol":1}'),
    "data before hello": _frame(p.MsgType.DATA, b"\0" * 8),
    "fetch of chunk that does not exist": HELLO
    + p.encode(p.MsgType.FETCH, {"transport": "tcp", "chunks": [[10**6, 0]]}),
    "fetch with unknown transport": HELLO
    + p.encode(p.MsgType.FETCH, {"transport": "x", "chunks": []}),
    "fetch of huge chunk list claim": HELLO + _frame(p.MsgType.FETCH, b"{", length=1 << 33),
    "manifest claiming 300 MB": HELLO + _frame(p.MsgType.MANIFEST, b"{", length=300 << 20),
}


def _assert_still_serves(address: str) -> None:
    expected = model_like()
    dest = empty_like_set(expected)
    Client([address]).load_into(dest, Identity("m"))
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_garbage_is_refused_and_server_keeps_serving(start_server, name: str) -> None:
    server = start_server("model_like", "--model", "m")
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(PAYLOADS[name])
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        try:
            while chunk := sock.recv(1 << 16):
                reply += chunk  # the server closes its side; it must not hang
        except ConnectionResetError:
            pass  # closing with our bytes unread resets the connection: fine
    # Whatever the server said last was a clear refusal (or it said nothing at all).
    if reply and not name.startswith(("truncated", "fetch of chunk", "fetch with")):
        assert p.MsgType.ERROR.to_bytes(1, "big") + b"\0\0\0" in reply
    assert server.proc.poll() is None
    _assert_still_serves(server.address)
    assert "Traceback" not in server.log_text()


def test_silent_and_many_connections_do_not_block_real_clients(start_server) -> None:
    server = start_server("model_like", "--model", "m")
    host, port = server.address.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(50)]
    try:
        _assert_still_serves(server.address)
    finally:
        for s in idle:
            s.close()
    assert server.proc.poll() is None
