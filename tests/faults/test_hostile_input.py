"""A hostile peer sends malformed data. To the server: garbage, truncated and oversized
messages on its port, each refused while it goes on serving the next real client. To the
client: a manifest that does not validate, a clear error and a failover."""

from __future__ import annotations

import socket
import struct

import pytest

from netloader import Client, Identity
from netloader import protocol as p
from netloader.protocol import PROTOCOL_VERSION
from netloader.testing.models import same_bytes, transformer_like
from support.servers import FakeServer, StartServer, assert_serves, connect
from support.tensors import empty_like_set

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


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_garbage_is_refused_and_server_keeps_serving(start_server: StartServer, name: str) -> None:
    server = start_server("transformer_like", "--model", "m")
    with connect(server.address) as sock:
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
    assert_serves(server.address)
    assert "Traceback" not in server.log_text()


def test_malformed_manifest_from_a_hostile_server_fails_over(
    start_server: StartServer, fake_server: FakeServer
) -> None:
    """A fake server that completes the handshake, then sends a manifest that does not
    validate (no model name, byte count not matching dtype x shape): a clear
    TransferError, and the next source still serves the pull."""
    body = {
        "protocol": 1,
        "digest": "xxh3_128",
        "chunk_bytes": 1,
        "identity": {},
        "tensors": [["x", "float32", [2], 4, []]],
    }
    bad = fake_server(
        p.Welcome(PROTOCOL_VERSION, False, p.new_nonce(), None).encode(),
        p.encode(p.MsgType.MANIFEST, body),
    )
    good = start_server("transformer_like", "--model", "m")
    expected = transformer_like()
    dest = empty_like_set(expected)
    report = Client([bad, good.address]).load_into(dest, Identity("m"))
    assert report.sources == (good.address,)
    assert "broke the protocol" in report.failures[0]
    assert all(same_bytes(dest[n], t) for n, t in expected.items())
