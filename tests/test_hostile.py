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


def test_silent_connections_from_another_peer_do_not_block_real_clients(start_server) -> None:
    server = start_server("model_like", "--model", "m")
    host, port = server.address.rsplit(":", 1)
    # 100 silent connections from 127.0.0.2: that peer hits its cap (16), the rest are
    # refused at once, and a client from 127.0.0.1 is served as if nothing happened.
    idle = [
        socket.create_connection((host, int(port)), timeout=5, source_address=("127.0.0.2", 0))
        for _ in range(100)
    ]
    try:
        _assert_still_serves(server.address)
    finally:
        for s in idle:
            s.close()
    assert server.proc.poll() is None
    assert "too many connections from 127.0.0.2 (limit 16)" in server.log_text()


def test_connection_caps_refuse_clearly_and_recover() -> None:
    import time

    import torch

    from netloader import LoadedTensors, Server, SourceUnavailable

    tensors = {"x": torch.arange(10.0)}
    with Server(
        LoadedTensors(tensors, Identity("m")), max_connections=8, max_connections_per_peer=3
    ) as server:
        idle = [socket.create_connection(tuple(server.address), timeout=5) for _ in range(3)]
        dest = {"x": torch.zeros(10)}
        with pytest.raises(SourceUnavailable, match=r"too many connections from 127\.0\.0\.1"):
            Client([server.address]).load_into(dest, Identity("m"))
        for s in idle:
            s.close()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed connections and frees their slots
            try:
                Client([server.address]).load_into(dest, Identity("m"))
                break
            except SourceUnavailable:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert torch.equal(dest["x"], tensors["x"])
