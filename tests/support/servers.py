"""Peers for the tests: real server processes (tests/support/peer.py serving a synthetic
model, or `netloader serve` serving a checkpoint), fault-injecting proxies and scripted
fake servers, each stopped at the end of the test that made it (tests/conftest.py has
the fixtures), and the `netloader` command line.

The fixtures hand out factories; annotate a test's parameters with these aliases:

    def test_x(start_server: StartServer, proxy: MakeProxy) -> None:
        server = start_server("transformer_like", "--model", "m")
        slow = proxy(server.address, rate=8 << 20)
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from netloader import Client, Identity, LoadReport
from netloader.settings import DEFAULT_TIMEOUTS, Timeouts
from netloader.testing.models import Tensors, differing, transformer_like
from netloader.testing.processes import SERVING, ServerProcess, netloader_command
from support.proxy import FaultyProxy, host_port
from support.tensors import empty_like_set

PEER = str(Path(__file__).with_name("peer.py"))
PEER_READY = r"^ADDR (?P<address>\S+)$"
NETLOADER = netloader_command()

StartServer = Callable[..., ServerProcess]
"""start_server(set, *peer_args): tests/support/peer.py serving SETS[set]."""
StartCliServer = Callable[..., ServerProcess]
"""cli_server(model_dir, *serve_args): `netloader serve model_dir ...`."""
MakeProxy = Callable[..., FaultyProxy]
"""proxy(address, **faults): a FaultyProxy in front of `address`."""
FakeServer = Callable[..., str]
"""fake_server(*replies): the "host:port" of a scripted peer (see FakeServers)."""


def connect(
    address: str | tuple[str, int], timeout: float = 5.0, source_host: str | None = None
) -> socket.socket:
    """A raw TCP connection to a server ("host:port" or (host, port)), from `source_host`."""
    source = None if source_host is None else (source_host, 0)
    return socket.create_connection(host_port(address), timeout, source)


def assert_serves(address: str, model: str = "m") -> None:
    """A whole pull of transformer_like() from `address` arrives bit-identical."""
    expected = transformer_like()
    dest = empty_like_set(expected)
    Client([address]).load_into(dest, Identity(model))
    assert not differing(dest, expected)


def pull_while_killing_the_first(
    start_server: StartServer,
    transport: str,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    *,
    peer_args: tuple[str, ...] = ("transformer_like", "--model", "m", "--chunk-bytes", "131072"),
    expected: Tensors | None = None,
    destination: Callable[[Tensors], Tensors] = empty_like_set,
    readback: Callable[[Tensors], Mapping[str, torch.Tensor]] = dict,
    secret: bytes | None = None,
) -> tuple[LoadReport, str]:
    """Pull a model (`expected`, default transformer_like()) from two server processes
    (tests/support/peer.py `peer_args`) one at a time over `transport`, into
    `destination(expected)`, SIGKILLing the first once the first chunk from it is verified;
    the report (the pull must finish, bit-identical as `readback` shows it) and the killed
    server's address."""
    doomed, spare = start_server(*peer_args), start_server(*peer_args)
    expected = transformer_like() if expected is None else expected
    dest = destination(expected)
    killed: list[int] = []

    def kill_on_first_chunk(_: int) -> None:
        if not killed:
            doomed.proc.send_signal(signal.SIGKILL)
            killed.append(doomed.proc.wait(timeout=10))

    client = Client(
        [doomed.address, spare.address],
        secret=secret,
        stripe=1,
        transport=transport,
        timeouts=timeouts,
    )
    report = client.load_into(dest, Identity("m"), progress=kill_on_first_chunk)
    assert killed == [-signal.SIGKILL]
    assert not differing(dict(readback(dest)), expected)
    assert 0 < dict(report.bytes_by_source)[spare.address] < report.bytes
    return report, doomed.address


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`netloader ARGS...` to completion, its output captured."""
    return subprocess.run([NETLOADER, *args], capture_output=True, text=True, timeout=timeout)


class Servers:
    """Server processes started for one test, their stderr logged in `logs`."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[ServerProcess] = []

    def peer(self, *args: str) -> ServerProcess:
        """tests/support/peer.py ARGS: serves a synthetic model, prints "ADDR host:port"."""
        return self._start([sys.executable, PEER, *args], PEER_READY, signal.SIGTERM)

    def cli(self, model_dir: Path, *args: str) -> ServerProcess:
        """`netloader serve MODEL_DIR ARGS`, stopped as a user would (Ctrl-C)."""
        argv = [NETLOADER, "serve", str(model_dir), *args]
        return self._start(argv, SERVING, signal.SIGINT)

    def _start(self, argv: list[str], ready: str | re.Pattern[str], stop: int) -> ServerProcess:
        log = self.logs / f"server{len(self.started)}.log"
        server = ServerProcess(argv, log=log, ready=ready, stop_signal=stop)
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.stop(timeout=20)


class Proxies:
    def __init__(self) -> None:
        self.made: list[FaultyProxy] = []

    def __call__(self, address: str | tuple[str, int], **faults: Any) -> FaultyProxy:
        proxy = FaultyProxy(address, **faults)
        self.made.append(proxy)
        return proxy

    def close(self) -> None:
        for proxy in self.made:
            proxy.close()


class FakeServers:
    """fake_server(reply, ...) -> "host:port" of a scripted peer: for one connection, it
    reads a message and answers with the next reply, for each reply, then hangs up."""

    def __init__(self) -> None:
        self.listeners: list[socket.socket] = []

    def __call__(self, *replies: bytes) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        self.listeners.append(listener)

        def script() -> None:
            conn, _ = listener.accept()
            with conn:
                for reply in replies:
                    conn.recv(1 << 16)
                    conn.sendall(reply)
                conn.recv(1 << 16)

        threading.Thread(target=script, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
