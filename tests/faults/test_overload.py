"""Too many clients at once: the server's caps on connections (in all and per peer) and
on transfers refuse clearly and recover; a flood of silent connections from one peer
does not block the others; and a soak of hundreds of concurrent pulls leaves the
server's memory, file descriptors and threads where they were.

NETLOADER_SOAK_PULLS sets the soak's number of pulls (default 1000); its figures are
printed and written to runs/soak.json."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import netloader
from netloader import Client, Endpoint, Identity, Limits, Server, Timeouts
from netloader import protocol as p
from netloader.errors import ServerBusy
from netloader.server import LoadedTensors
from netloader.testing.models import same_bytes, transformer_like
from netloader.testing.processes import process_usage
from support.limited import MIB, legit_pull
from support.servers import MakeProxy, StartServer, assert_serves, connect
from support.tensors import empty_like_set

RUNS = Path(__file__).parents[2] / "runs"
PULLS = int(os.environ.get("NETLOADER_SOAK_PULLS", "1000"))
AT_ONCE = 6
WARMUP = 20


def test_max_transfers_refuses_clearly_then_recovers(served: Server, proxy: MakeProxy) -> None:
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
        legit_pull(served)
    for t in pulls:
        t.join()
    legit_pull(served)


def test_silent_connections_from_another_peer_do_not_block_real_clients(
    start_server: StartServer,
) -> None:
    server = start_server("transformer_like", "--model", "m")
    # 100 silent connections from 127.0.0.2: that peer hits its cap (16), and each newer
    # one sheds the oldest still in its handshake; a client from 127.0.0.1 is served as if
    # nothing happened.
    idle = [connect(server.address, source_host="127.0.0.2") for _ in range(100)]
    try:
        assert_serves(server.address)
    finally:
        for s in idle:
            s.close()
    assert server.proc.poll() is None
    assert "shed 127.0.0.2:" in server.log_text()


def test_silent_connections_at_the_cap_make_room_for_a_real_client() -> None:
    """Slowloris: connections that never finish their handshake fill a peer's cap; a real
    client from the same address still gets in (the oldest silent one is shed)."""
    tensors = {"x": torch.arange(10.0)}
    with Server(
        LoadedTensors(tensors, Identity("m")),
        limits=Limits(max_connections=4, max_connections_per_peer=3),
    ) as server:
        silent = [connect(server.address) for _ in range(3)]
        dest = {"x": torch.zeros(10)}
        Client([server.address]).load_into(dest, Identity("m"))
        assert torch.equal(dest["x"], tensors["x"])
        for s in silent:
            s.close()


def _handshaken(address: Endpoint) -> socket.socket:
    """A connection that finished its handshake and then idles."""
    sock = connect(address)
    sock.sendall(p.Hello(p.PROTOCOL_VERSION, p.new_nonce()).encode())
    header = p.decode_header(sock.recv(p.HEADER.size, socket.MSG_WAITALL))
    assert header.type is p.MsgType.WELCOME
    sock.recv(header.length, socket.MSG_WAITALL)
    return sock


def test_connection_caps_refuse_clearly_and_recover() -> None:
    """Connections past their handshake are never shed: at the cap a newcomer is told
    "busy", retries within its connect timeout, and gets in once one closes."""
    tensors = {"x": torch.arange(10.0)}
    with Server(
        LoadedTensors(tensors, Identity("m")),
        limits=Limits(max_connections=8, max_connections_per_peer=3),
    ) as server:
        idle = [_handshaken(server.address) for _ in range(3)]
        dest = {"x": torch.zeros(10)}
        with pytest.raises(ServerBusy, match=r"too many connections from 127\.0\.0\.1"):
            Client([server.address], timeouts=Timeouts(connect=1)).load_into(dest, Identity("m"))
        closer = threading.Timer(0.5, idle[0].close)
        closer.start()  # while the next client is retrying
        Client([server.address], timeouts=Timeouts(connect=10)).load_into(dest, Identity("m"))
        assert torch.equal(dest["x"], tensors["x"])
        closer.join()
        for s in idle[1:]:
            s.close()


# ---- soak ---------------------------------------------------------------------------------


def _usage(pid: int) -> dict[str, int]:
    usage = process_usage(pid)
    return {"rss_kb": usage["VmRSS"], "threads": usage["Threads"], "fds": usage["fds"]}


def _settled(pid: int, baseline: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """Usage once the server has finished closing connections (threads end just after
    the client's last byte)."""
    deadline = time.monotonic() + timeout
    usage = _usage(pid)
    while time.monotonic() < deadline and (
        usage["threads"] > baseline["threads"] or usage["fds"] > baseline["fds"]
    ):
        time.sleep(0.05)
        usage = _usage(pid)
    return usage


def test_soak_resources_stay_flat(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(1 << 20))
    pid = server.proc.pid
    expected = transformer_like()
    size = sum(t.nbytes for t in expected.values())

    def pull(_: int) -> bool:
        dest = empty_like_set(expected)
        Client([server.address]).load_into(dest, Identity("m"))
        return all(same_bytes(dest[n], t) for n, t in expected.items())

    with ThreadPoolExecutor(AT_ONCE) as pool:
        assert all(pool.map(pull, range(WARMUP)))
        before = _settled(pid, _usage(pid))
        started = time.monotonic()
        assert all(pool.map(pull, range(PULLS)))
        seconds = time.monotonic() - started
    after = _settled(pid, before)
    figures = {
        "pulls": PULLS,
        "concurrent": AT_ONCE,
        "bytes_per_pull": size,
        "seconds": round(seconds, 2),
        "before": before,
        "after": after,
    }
    print(f"\nsoak: {json.dumps(figures)}")
    RUNS.mkdir(exist_ok=True)
    (RUNS / "soak.json").write_text(json.dumps(figures, indent=1))
    assert after["fds"] == before["fds"], figures
    assert after["threads"] == before["threads"], figures
    assert after["rss_kb"] - before["rss_kb"] < 16 * 1024, figures  # no per-pull growth
    assert server.proc.poll() is None
