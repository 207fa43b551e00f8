"""Fixtures that start real netloader server processes and fault-injecting proxies."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from proxy import FaultyProxy

HERE = Path(__file__).parent
PYTHON = sys.executable


@dataclass
class ServerProcess:
    address: str
    proc: subprocess.Popen[str]
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def _start(args: list[str], log: Path, timeout: float = 60) -> ServerProcess:
    err = open(log, "w")  # noqa: SIM115 - the child writes to it for its whole life
    proc = subprocess.Popen(
        [PYTHON, str(HERE / "peer.py"), *args],
        stdout=subprocess.PIPE,
        stderr=err,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("ADDR ") or time.monotonic() > deadline:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}\n{log.read_text()}")
    return ServerProcess(line.split()[1], proc, log)


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """start_server("model_like", "--model", "m") -> a running server process."""
    started: list[ServerProcess] = []

    def start(*args: str) -> ServerProcess:
        server = _start(list(args), tmp_path / f"server{len(started)}.log")
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()


@pytest.fixture
def proxy() -> Iterator[Callable[..., FaultyProxy]]:
    made: list[FaultyProxy] = []

    def make(address: str, **faults: object) -> FaultyProxy:
        host, port = address.rsplit(":", 1)
        p = FaultyProxy((host, int(port)), **faults)  # type: ignore[arg-type]
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., str]]:
    """fake_server(reply, ...) -> "host:port" of a scripted peer: for one connection, it
    reads a message and answers with the next reply, for each reply, then hangs up."""
    listeners: list[socket.socket] = []

    def start(*replies: bytes) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def script() -> None:
            conn, _ = listener.accept()
            with conn:
                for reply in replies:
                    conn.recv(1 << 16)
                    conn.sendall(reply)
                conn.recv(1 << 16)

        threading.Thread(target=script, daemon=True).start()
        return f"127.0.0.1:{listener.getsockname()[1]}"

    yield start
    for listener in listeners:
        listener.close()
