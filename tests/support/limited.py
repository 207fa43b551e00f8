"""An in-process server with tight limits (short timeouts, two transfers at once), and
the checks the fault tests make around it: a legitimate client is still served, and
every connection of a client that went away is freed."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from netloader import Client, Identity, Limits, Server, Timeouts
from netloader.server import LoadedTensors

MIB = 1 << 20


@contextmanager
def limited_server() -> Iterator[Server]:
    """32 MiB in four tensors t0..t3 (t_i filled with i), 1 MiB chunks; 1 s stall and
    handshake timeouts; at most 2 transfers at once."""
    tensors = {f"t{i}": torch.full((2 * MIB,), float(i)) for i in range(4)}
    with Server(
        LoadedTensors(tensors, Identity("m"), chunk_bytes=MIB),
        timeouts=Timeouts(stall=1.0, handshake=1.0),
        limits=Limits(max_transfers=2),
    ) as server:
        server.manifest(timeout=30)
        yield server


def legit_pull(server: Server) -> None:
    """A whole pull from `server` by a well-behaved client, checked."""
    tensors = {f"t{i}": torch.empty(2 * MIB) for i in range(4)}
    Client([server.address]).load_into(tensors, Identity("m"))
    assert all(bool((t == float(i)).all()) for i, t in enumerate(tensors.values()))


def wait_idle(server: Server, timeout: float = 10) -> None:
    """Until `server` has no connection left; fails if one is never freed."""
    deadline = time.monotonic() + timeout
    while server.connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.connections == 0, "a dead client's connection was never freed"


def close_with_reset(sock: socket.socket) -> None:
    """Close with a TCP reset (linger 0) instead of a clean FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
