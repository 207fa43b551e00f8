"""Attacks a hostile peer on the network can try, each refused with a clear error while the
server goes on serving everyone else, and nothing wrong is ever accepted as verified: a
relay in the middle without the secret, memory claimed before authentication, slow
handshakes and dripped bytes, a source that fails after its handshake, and a model of
100,000 chunks."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch

import netloader
from netloader import AuthenticationError, Client, Identity, Server, Timeouts, TransferError
from netloader import protocol as p
from netloader.manifest import build_manifest
from netloader.server import LoadedTensors
from netloader.testing.models import same_bytes, transformer_like
from netloader.testing.processes import process_usage
from support.servers import FakeServer, MakeProxy, StartServer, connect
from support.tensors import empty_like_set, untouched

SECRET = "the attack tests' shared secret"


def _read_frame(sock: socket.socket) -> bytes:
    head = sock.recv(p.HEADER.size, socket.MSG_WAITALL)
    header = p.decode_header(head)
    return head + (sock.recv(header.length, socket.MSG_WAITALL) if header.length else b"")


class RelayingAttacker:
    """A man in the middle without the secret: passes HELLO, WELCOME and AUTH between a
    client and the real server, then answers the client itself with a forged manifest
    whose digests match forged tensors, and asks the server for the manifest itself."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.server_said: list[bytes] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client, _ = self.listener.accept()
        server = connect(self.upstream)
        with client, server:
            server.sendall(_read_frame(client))  # HELLO
            client.sendall(_read_frame(server))  # WELCOME
            server.sendall(_read_frame(client))  # AUTH
            _read_frame(client)  # the client's (tagged) GET_MANIFEST: not passed on
            forged = {n: torch.zeros_like(t) for n, t in transformer_like().items()}
            manifest = build_manifest(Identity("m"), forged, 1 << 20)
            client.sendall(p.ManifestMessage(manifest).encode())
            server.sendall(p.GetManifest().encode())  # untagged: the attacker has no key
            self.server_said.append(_read_frame(server))
            time.sleep(0.5)  # let the client read before closing


def test_a_relay_without_the_secret_can_neither_feed_nor_read_a_model(
    start_server: StartServer,
) -> None:
    server = start_server("transformer_like", "--model", "m", "--secret", SECRET)
    attacker = RelayingAttacker(server.address)
    dest = empty_like_set(transformer_like())
    with pytest.raises(AuthenticationError, match="failed its session check") as info:
        Client([attacker.address], secret=SECRET.encode()).load_into(dest, Identity("m"))
    assert info.value.completed == frozenset() and untouched(dest)
    attacker.thread.join(timeout=10)
    frame = attacker.server_said[0]  # tagged under the session key: the JSON, then the tag
    error = p.Error.decode(p.decode_body(frame[p.HEADER.size : -p.TAG_BYTES]))
    assert error.code is p.ErrorCode.AUTH
    assert "failed authentication" in server.log_text()
    assert_serves_with_secret(server.address)


def assert_serves_with_secret(address: str) -> None:
    expected = transformer_like()
    dest = empty_like_set(expected)
    netloader.load(dest, [address], "m", secret=SECRET)
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_memory_claimed_before_authentication_is_never_allocated(
    start_server: StartServer,
) -> None:
    """First frames claiming a 256 MiB MANIFEST or a 64 MiB FETCH (a JSON bomb) are
    refused from their header: the server's memory stays where it was."""
    server = start_server("transformer_like", "--model", "m", "--secret", SECRET)
    before = process_usage(server.proc.pid)["VmRSS"]
    socks = []
    for kind, size in [(p.MsgType.MANIFEST, 256 << 20), (p.MsgType.FETCH, 64 << 20)] * 8:
        sock = connect(server.address)
        sock.sendall(p.HEADER.pack(p.MAGIC, kind, size) + b"[{}," * 1000)
        socks.append(sock)
    for sock in socks:
        error = p.Error.decode(p.decode_body(_read_frame(sock)[p.HEADER.size :]))
        assert error.code is p.ErrorCode.BAD_REQUEST and "expected HELLO" in error.message
        sock.close()
    after = process_usage(server.proc.pid)["VmRSS"]
    assert after - before < 32 << 10, (before, after)  # kB: no 256 MiB anywhere
    assert_serves_with_secret(server.address)


def test_a_handshake_has_a_total_deadline_however_slowly_it_drips() -> None:
    with Server(
        LoadedTensors({"x": torch.ones(4)}, Identity("m")), timeouts=Timeouts(handshake=1.0)
    ) as server:
        sock = connect(str(server.address))
        hello = p.Hello(p.PROTOCOL_VERSION, p.new_nonce()).encode()
        started = time.monotonic()
        with pytest.raises(OSError):
            for byte in hello:  # one byte every 0.2 s: never silent for a whole second
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                if sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                    raise ConnectionResetError("closed")
        assert time.monotonic() - started < 5
        sock.close()


def test_a_welcome_dripped_byte_by_byte_ends_within_the_connect_timeout() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    welcome = p.Welcome(p.PROTOCOL_VERSION, False, p.new_nonce(), None).encode()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            conn.recv(4096)
            for byte in welcome:
                conn.sendall(bytes([byte]))
                time.sleep(0.3)

    threading.Thread(target=drip, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(TransferError, match="took longer than"):
        Client([f"127.0.0.1:{listener.getsockname()[1]}"], timeouts=Timeouts(connect=2)).manifest()
    assert time.monotonic() - started < 5
    listener.close()


def test_dripped_data_ends_within_the_chunk_deadline(
    start_server: StartServer, proxy: MakeProxy
) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(1 << 20))
    slow = proxy(server.address, rate=32 << 10)  # 32 KiB/s: a 1 MiB chunk would take 32 s
    dest = empty_like_set(transformer_like())
    started = time.monotonic()
    # The proxy forwards up to 64 KiB, then pauses 2 s: a stall timeout above that pause
    # leaves the chunk deadline (stall + 1 MiB at min_rate = 5 s) as what must end it.
    with pytest.raises(TransferError, match="took longer than"):
        Client([slow.address], timeouts=Timeouts(stall=4, min_rate=1 << 20)).load_into(
            dest, Identity("m")
        )
    assert time.monotonic() - started < 20  # against 32 s for the chunk at this rate


def test_a_source_failing_after_its_handshake_moves_on_to_the_next(
    start_server: StartServer, fake_server: FakeServer
) -> None:
    """Both the manifest-only path (`inspect`) and the pull fail over from a source that
    answers the handshake and then breaks the protocol in the manifest phase."""
    good = start_server("transformer_like", "--model", "m")
    welcome = p.Welcome(p.PROTOCOL_VERSION, False, p.new_nonce(), None).encode()
    broken = p.HEADER.pack(p.MAGIC, p.MsgType.MANIFEST, 11) + b'{"x":1e999}'
    bad = fake_server(welcome, broken)
    manifest = Client([bad, good.address]).manifest()
    assert manifest.identity.model == "m"
    bad = fake_server(welcome, broken)
    expected = transformer_like()
    dest = empty_like_set(expected)
    report = Client([bad, good.address], stripe=1).load_into(dest, Identity("m"))
    assert report.sources == (good.address,) and report.failures
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_a_model_of_100000_chunks_arrives_whole() -> None:
    """Large MoE checkpoints have tens of thousands of tensors: one FETCH for all of them,
    scheduled in linear time, well within the server's patience."""
    tensors = {f"experts.{i}.w": torch.full((4,), float(i)) for i in range(100_000)}
    with netloader.serve(tensors, "moe") as server:
        server.manifest()
        dest = {name: torch.empty(4) for name in tensors}
        report = netloader.load(dest, [server.address], "moe")
    assert report.tensors == 100_000
    assert all(torch.equal(dest[n], t) for n, t in tensors.items())


def test_busy_is_transient_the_client_retries_within_its_connect_timeout() -> None:
    tensors = {"x": torch.arange(6.0)}
    with Server(
        LoadedTensors(tensors, Identity("m")),
        limits=netloader.Limits(max_connections=2, max_connections_per_peer=1),
    ) as server:
        # One connection past its handshake holds the only slot for 1 s.
        holder = connect(str(server.address))
        holder.sendall(p.Hello(p.PROTOCOL_VERSION, p.new_nonce()).encode())
        _read_frame(holder)
        threading.Timer(1.0, holder.close).start()
        dest = {"x": torch.zeros(6)}
        Client([server.address], timeouts=Timeouts(connect=8)).load_into(dest, Identity("m"))
        assert torch.equal(dest["x"], tensors["x"])
