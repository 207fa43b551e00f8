"""The Python API driven by the seed configuration, per rank; authentication."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

import netloader
from netloader import (
    AuthenticationError,
    Identity,
    NetloaderConfig,
    SourceUnavailable,
    TransferError,
)
from netloader import protocol as p
from netloader.protocol import PROTOCOL_VERSION
from netloader.testing.models import blocks, same_bytes, transformer_like
from support.servers import MakeProxy, StartServer
from support.tensors import empty_like_set


def test_serve_and_load_per_rank_with_output_prefix(tmp_path: Path) -> None:
    expected = transformer_like()
    prefix = str(tmp_path / "addr_")
    server_cfg = NetloaderConfig.load({"OUTPUT_PREFIX": prefix}, environ={})
    servers = [
        netloader.serve_rank(expected, Identity("m", tp_size=2, tp_rank=r), server_cfg, r)
        for r in (0, 1)
    ]
    try:
        addresses = [(tmp_path / f"addr_{r}.txt").read_text().strip() for r in (0, 1)]
        assert addresses == [str(s.address) for s in servers if s is not None]
        client_cfg = NetloaderConfig.load(
            {"SOURCE": [{"device_id": r, "sources": [addresses[r]]} for r in (0, 1)]}, environ={}
        )
        for rank in (0, 1):
            dest = empty_like_set(expected)
            netloader.load_rank(dest, Identity("m", tp_size=2, tp_rank=rank), client_cfg, rank)
            assert all(same_bytes(dest[n], t) for n, t in expected.items())
        with pytest.raises(SourceUnavailable, match="no sources for rank 2"):
            netloader.load_rank({}, Identity("m"), client_cfg, 2)
    finally:
        for s in servers:
            if s is not None:
                s.close()


def test_listen_port_plus_rank_and_out_of_range() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    base = probe.getsockname()[1]
    probe.close()
    cfg = NetloaderConfig.load({"LISTEN_PORT": base - 1}, environ={})
    server = netloader.serve_rank(transformer_like(), Identity("m"), cfg, 1)
    assert server is not None and server.address.port == base
    server.close()
    high = NetloaderConfig.load({"LISTEN_PORT": 65535}, environ={})
    assert netloader.serve_rank(transformer_like(), Identity("m"), high, 1) is None


def test_output_file_is_written_only_once_listening(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "seed0.txt"
    with netloader.serve({"x": torch.ones(3)}, identity="m", output_file=out) as server:
        assert out.read_text() == f"{server.address}\n"
        assert not list(out.parent.glob(".seed0.txt.*"))  # no temp file left behind
        dest = {"x": torch.zeros(3)}
        netloader.load(dest, [out.read_text().strip()], identity="m")
        assert torch.equal(dest["x"], torch.ones(3))


def test_secret_right_wrong_and_missing(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = start_server("transformer_like", "--model", "m", "--secret", "the api test secret 1")
    expected = transformer_like()
    dest = empty_like_set(expected)
    netloader.load(dest, [server.address], identity="m", secret="the api test secret 1")
    assert all(same_bytes(dest[n], t) for n, t in expected.items())
    with pytest.raises(AuthenticationError, match="could not prove"):
        netloader.load(
            empty_like_set(expected),
            [server.address],
            identity="m",
            secret="a wrong secret, long enough",
        )
    with pytest.raises(AuthenticationError, match="requires a secret"):
        netloader.load(empty_like_set(expected), [server.address], identity="m")
    monkeypatch.setenv("NETLOADER_SECRET", "the api test secret 1")
    netloader.load(empty_like_set(expected), [server.address], identity="m")
    log = server.log_text()
    assert "the api test secret" not in log and "without a secret" not in log


def test_client_with_secret_refuses_open_server(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "m")
    with pytest.raises(AuthenticationError):
        netloader.load(
            empty_like_set(transformer_like()),
            [server.address],
            identity="m",
            secret="another wrong secret here",
        )
    assert "without a secret" in server.log_text()


def test_unauthenticated_peer_learns_nothing(start_server: StartServer) -> None:
    """Raw peer: after HELLO, asking for the manifest without AUTH gets no manifest."""
    server = start_server(
        "transformer_like", "--model", "secret-model-name", "--secret", "the api test secret 2"
    )
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(p.Hello(PROTOCOL_VERSION, p.new_nonce()).encode())
        sock.sendall(p.encode(p.MsgType.GET_MANIFEST, {}))
        received = b""
        try:
            while chunk := sock.recv(1 << 16):
                received += chunk
        except ConnectionResetError:
            pass
    assert b"secret-model-name" not in received and b"embed" not in received
    assert b'"auth":true' in received  # WELCOME said a secret is needed; nothing more


def test_close_ends_active_transfers_and_frees_everything(proxy: MakeProxy) -> None:
    before = {t.name for t in threading.enumerate()}
    server = netloader.serve(blocks(), identity="m")
    slow = proxy(str(server.address), rate=8 << 20)
    errors: list[Exception] = []

    def pull() -> None:
        try:
            netloader.load(
                empty_like_set(blocks()),
                [slow.address],
                identity="m",
                timeouts=netloader.Timeouts(stall=5),
            )
        except TransferError as exc:
            errors.append(exc)

    client = threading.Thread(target=pull)
    client.start()
    while slow.forwarded < (4 << 20):
        time.sleep(0.02)
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 6
    client.join(timeout=20)
    assert len(errors) == 1  # the client saw the end clearly, it did not hang
    leftover = {t.name for t in threading.enumerate()} - before
    assert not [n for n in leftover if n.startswith("netloader-") and n != "netloader-digest"]
    socket.create_server(("127.0.0.1", server.address.port)).close()  # the port is free again


def test_an_output_prefix_that_cannot_be_written_does_not_stop_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = NetloaderConfig.load({"OUTPUT_PREFIX": "/proc/no/such/dir/nl_"}, environ={})
    tensors = {"x": torch.arange(4.0)}
    server = netloader.serve_rank(tensors, Identity("m"), config, 0)
    assert server is not None
    with server:
        dest = {"x": torch.zeros(4)}
        netloader.load(dest, [server.address], "m")
        assert torch.equal(dest["x"], tensors["x"])
    assert "cannot write OUTPUT_PREFIX file /proc/no/such/dir/nl_0.txt" in caplog.text
