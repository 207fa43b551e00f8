"""The fault-injection suite: a peer that dies at each phase of the conversation (with a
clean close or a reset), a client frozen or killed mid-transfer, a client that says
nothing, wrong protocol versions, and the server's limits. In every case the client
raises a clear TransferError in bounded time and never accepts a wrong byte, and the
server goes on serving legitimate clients with nothing leaked."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tensorsets import empty_like_set, model_like, same_bytes

import netloader
from netloader import Client, Identity, LoadedTensors, Server, TransferError
from netloader import protocol as p
from netloader.manifest import PROTOCOL_VERSION

MIB = 1 << 20
HERE = Path(__file__).parent


def _frames(stream: bytes) -> list[tuple[p.MsgType, int, int, int | None]]:
    """(type, start, end, tensor index for DATA) of each frame in a recorded stream."""
    out, at = [], 0
    while at < len(stream):
        header = p.decode_header(stream[at : at + p.HEADER.size])
        body = at + p.HEADER.size
        tensor = None
        if header.type is p.MsgType.DATA:
            tensor, _ = p.decode_data_prefix(stream[body : body + p.DATA_PREFIX.size])
        out.append((header.type, at, body + header.length, tensor))
        at = body + header.length
    return out


@pytest.fixture(scope="module")
def layout() -> Iterator[list[tuple[p.MsgType, int, int, int | None]]]:
    """The server->client byte stream of a whole pull of model_like(), frame by frame."""
    sys.path.insert(0, str(HERE))
    from proxy import FaultyProxy

    with netloader.serve(model_like(), model_name="m", chunk_bytes=MIB) as server:
        recorder = FaultyProxy(tuple(server.address), record=True)  # type: ignore[arg-type]
        Client([recorder.address]).load_into(empty_like_set(model_like()), Identity("m"))
        recorder.close()
    assert recorder.recorded is not None
    yield _frames(bytes(recorder.recorded))


def _phase_offset(layout: list, phase: str) -> int:
    data = [f for f in layout if f[0] is p.MsgType.DATA]
    manifest = next(f for f in layout if f[0] is p.MsgType.MANIFEST)
    first_tensor = data[0][3]
    return {
        "before handshake": 0,
        "mid welcome": 20,
        "during manifest": manifest[1] + (manifest[2] - manifest[1]) // 2,
        "mid-tensor": data[2][1] + 5000,
        "between tensors": max(f[2] for f in data if f[3] == first_tensor),
        "before end": data[-1][2],
    }[phase]


PHASES = ["before handshake", "mid welcome", "during manifest", "mid-tensor", "between tensors"]


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("phase", PHASES)
def test_server_dies_at_each_phase(start_server, proxy, layout, phase: str, reset: bool) -> None:
    server = start_server("model_like", "--model", "m", "--chunk-bytes", str(MIB))
    dying = proxy(server.address, cut_at=_phase_offset(layout, phase), reset=reset)
    expected = model_like()
    dest = empty_like_set(expected)
    start = time.monotonic()
    with pytest.raises(TransferError) as info:
        Client([dying.address], stall_timeout=3).load_into(dest, Identity("m"))
    assert time.monotonic() - start < 5  # a hang-up is noticed at once, not by timeout
    assert "pull incomplete" in str(info.value)
    completed = info.value.completed
    for name in completed:
        assert same_bytes(dest[name], expected[name])
    if phase == "between tensors":  # a reset may discard bytes the client had not read yet
        assert len(completed) in ((0, 1) if reset else (1,))
    elif phase != "mid-tensor":
        assert not completed


@pytest.mark.parametrize("phase", [*PHASES, "before end"])
def test_fallback_source_completes_after_death_at_any_phase(
    start_server, proxy, layout, phase: str
) -> None:
    server = start_server("model_like", "--model", "m", "--chunk-bytes", str(MIB))
    backup = start_server("model_like", "--model", "m", "--chunk-bytes", str(MIB))
    dying = proxy(server.address, cut_at=_phase_offset(layout, phase), reset=True)
    expected = model_like()
    dest = empty_like_set(expected)
    Client([dying.address, backup.address], stripe=1).load_into(dest, Identity("m"))
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


# ---- the server's side: clients that misbehave -------------------------------------------


@pytest.fixture
def served() -> Iterator[Server]:
    tensors = {f"t{i}": torch.full((2 * MIB,), float(i)) for i in range(4)}  # 32 MiB
    with Server(
        LoadedTensors(tensors, Identity("m"), chunk_bytes=MIB),
        stall_timeout=1.0,
        handshake_timeout=1.0,
        max_transfers=2,
    ) as server:
        server.manifest(timeout=30)
        yield server


def _legit_pull(server: Server) -> None:
    tensors = {f"t{i}": torch.empty(2 * MIB) for i in range(4)}
    Client([server.address]).load_into(tensors, Identity("m"))
    assert all(bool((t == float(i)).all()) for i, t in enumerate(tensors.values()))


def _wait_idle(server: Server, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections == 0, "a dead client's connection was never freed"


def _reset(sock: socket.socket) -> None:
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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
    sock = socket.create_connection(tuple(served.address), timeout=5)  # type: ignore[arg-type]
    for message in CLIENT_DEATHS[death]:
        sock.sendall(message)
    if death == "mid-transfer":
        sock.recv(1 << 20)  # the transfer is under way
    _reset(sock) if reset else sock.close()
    _legit_pull(served)
    _wait_idle(served)
    assert threading.active_count() <= threads_before


def test_silent_client_is_dropped_after_the_handshake_timeout(served: Server) -> None:
    sock = socket.create_connection(tuple(served.address), timeout=5)  # type: ignore[arg-type]
    start = time.monotonic()
    assert sock.recv(1024) == b""  # the server hung up on us
    assert time.monotonic() - start < 3
    sock.close()
    _legit_pull(served)


def test_idle_client_after_handshake_is_dropped(served: Server) -> None:
    sock = socket.create_connection(tuple(served.address), timeout=5)  # type: ignore[arg-type]
    sock.sendall(_hello())
    sock.recv(4096)  # WELCOME
    start = time.monotonic()
    assert sock.recv(4096) == b""
    assert time.monotonic() - start < 3
    sock.close()


@pytest.mark.parametrize("version", [0, 2, 2**31])
def test_wrong_protocol_version_is_refused_by_name(served: Server, version: int) -> None:
    sock = socket.create_connection(tuple(served.address), timeout=5)  # type: ignore[arg-type]
    sock.sendall(p.Hello(version, p.new_nonce()).encode())
    reply = sock.recv(4096)
    sock.close()
    header = p.decode_header(reply[: p.HEADER.size])
    body = p.decode_body(reply[p.HEADER.size : p.HEADER.size + header.length])
    assert header.type is p.MsgType.ERROR and body["code"] == "version"
    assert f"client {version}" in body["message"]
    _legit_pull(served)


def test_frozen_client_frees_its_transfer(served: Server) -> None:
    """A client process SIGSTOPped mid-transfer: the server's send stalls, times out,
    and the connection and transfer slot are freed while others are served."""
    script = (
        "import sys, torch, netloader\n"
        "t = {f't{i}': torch.empty(2 << 20) for i in range(4)}\n"
        "print('go', flush=True)\n"
        "netloader.load(t, [sys.argv[1]], model_name='m', stall_timeout=60)\n"
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
        _legit_pull(served)
        _wait_idle(served)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


def test_max_transfers_refuses_clearly_then_recovers(served: Server, proxy) -> None:
    slow = [proxy(str(served.address), rate=8 * MIB) for _ in range(2)]
    dests = [{f"t{i}": torch.empty(2 * MIB) for i in range(4)} for _ in range(2)]
    pulls = [
        threading.Thread(target=Client([s.address]).load_into, args=(d, Identity("m")))
        for s, d in zip(slow, dests, strict=True)
    ]
    for t in pulls:
        t.start()
    time.sleep(0.5)  # both slow transfers are under way (32 MiB at 8 MiB/s each)
    with pytest.raises(netloader.SourceUnavailable, match=r"server busy: 2 transfers"):
        _legit_pull(served)
    for t in pulls:
        t.join()
    _legit_pull(served)
