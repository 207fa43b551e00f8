"""A client misbehaves: it dies at each phase of the conversation (with a clean close or
a reset), says nothing, goes idle after the handshake, speaks another protocol version,
or is frozen mid-transfer. The server drops it in bounded time, frees its connection,
thread and transfer slot, and goes on serving legitimate clients."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import pytest

from netloader import Server
from netloader import protocol as p
from netloader.protocol import PROTOCOL_VERSION
from support.limited import close_with_reset, legit_pull, wait_idle
from support.servers import connect


def _hello() -> bytes:
    return p.Hello(PROTOCOL_VERSION, p.new_nonce()).encode()


CLIENT_DEATHS = {
    "connect and vanish": [],
    "after hello": [_hello()],
    "after asking for the manifest": [_hello(), p.encode(p.MsgType.GET_MANIFEST, {})],
    "mid-transfer": [
        _hello(),
        p.Fetch("tcp", tuple((t, c) for t in range(4) for c in range(8))).encode(),
    ],
}


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("death", sorted(CLIENT_DEATHS))
def test_client_dies_at_each_phase(served: Server, death: str, reset: bool) -> None:
    threads_before = threading.active_count()
    sock = connect(served.address)
    for message in CLIENT_DEATHS[death]:
        sock.sendall(message)
    if death == "mid-transfer":
        sock.recv(1 << 20)  # the transfer is under way
    close_with_reset(sock) if reset else sock.close()
    legit_pull(served)
    wait_idle(served)
    assert threading.active_count() <= threads_before


def test_silent_client_is_dropped_after_the_handshake_timeout(served: Server) -> None:
    sock = connect(served.address)
    start = time.monotonic()
    assert sock.recv(1024) == b""  # the server hung up on us
    assert time.monotonic() - start < 3
    sock.close()
    legit_pull(served)


def test_idle_client_after_handshake_is_dropped(served: Server) -> None:
    sock = connect(served.address)
    sock.sendall(_hello())
    sock.recv(4096)  # WELCOME
    start = time.monotonic()
    assert sock.recv(4096) == b""
    assert time.monotonic() - start < 3
    sock.close()


@pytest.mark.parametrize("version", [0, 2, p.PROTOCOL_VERSION + 1, 2**31])
def test_wrong_protocol_version_is_refused_by_name(served: Server, version: int) -> None:
    sock = connect(served.address)
    sock.sendall(p.Hello(version, p.new_nonce()).encode())
    reply = sock.recv(4096)
    sock.close()
    header = p.decode_header(reply[: p.HEADER.size])
    body = p.decode_body(reply[p.HEADER.size : p.HEADER.size + header.length])
    assert header.type is p.MsgType.ERROR and body["code"] == "version"
    assert f"client {version}" in body["message"]
    legit_pull(served)


def test_frozen_client_frees_its_transfer(served: Server) -> None:
    """A client process SIGSTOPped mid-transfer: the server's send stalls, times out,
    and the connection and transfer slot are freed while others are served."""
    script = (
        "import sys, torch, netloader\n"
        "t = {f't{i}': torch.empty(2 << 20) for i in range(4)}\n"
        "print('go', flush=True)\n"
        "netloader.load(t, [sys.argv[1]], identity='m', timeouts=netloader.Timeouts(stall=60))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(served.address)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        deadline = time.monotonic() + 30
        while served.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGSTOP)
        legit_pull(served)
        wait_idle(served)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()
