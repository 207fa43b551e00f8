"""Tensor bytes over a 2-rank torch.distributed process group built without the global
default group (the seed system's design), here with gloo between host memories. (NCCL is
not offered: it has never run on a GPU here; NIXL is the planned device path.)

The control connection carries the rendezvous: the server opens a TCPStore on a free port
of the address the client reached it on, sends GLOO{port, backend}, and both build the
group; the client confirms with DONE once every chunk is verified.
"""

from __future__ import annotations

import datetime
from collections import deque
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from netloader import protocol as p
from netloader.errors import PeerClosed, ProtocolError, TransferTimeout
from netloader.manifest import Chunk
from netloader.settings import Timeouts
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.connection import Connection

WINDOW = 4  # chunks in flight: keeps the pipe full without pinning much memory
SERVER_RANK, CLIENT_RANK = 0, 1


def _group(backend: str, store: Any, rank: int, local_host: str, timeout: float) -> Any:
    prefixed = dist.PrefixStore("netloader/", store)  # type: ignore[attr-defined]
    delta = datetime.timedelta(seconds=timeout)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_host)]
        opts._timeout = delta
        return dist.ProcessGroupGloo(prefixed, rank, 2, opts)
    raise ValueError(f"unknown process-group backend {backend!r}")


def _wait(work: Any, peer: str) -> None:
    try:
        work.wait()
    except RuntimeError as exc:
        text = str(exc)
        if "imeout" in text or "timed out" in text:
            raise TransferTimeout(
                f"{peer}: process-group transfer stalled: {text}", source=peer
            ) from exc
        raise PeerClosed(f"{peer}: process-group transfer failed: {text}", source=peer) from exc


class ProcessGroupTransport(Transport):
    """Chunks over a 2-rank group of `backend` ("gloo": host memory).
    TLS cannot cover it: the bytes travel outside the control connection."""

    tls = False

    def __init__(self, backend: str, memory: frozenset[str]) -> None:
        self.name = backend
        self.memory = memory

    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        local_host = conn.sock.getsockname()[0]
        store = dist.TCPStore(  # type: ignore[attr-defined]
            local_host,
            0,
            2,
            True,
            timeout=datetime.timedelta(seconds=timeouts.stall),
            wait_for_workers=False,
        )
        conn.send(p.ProcessGroupSetup(store.port, self.name))
        group = _group(self.name, store, SERVER_RANK, local_host, timeouts.stall)
        pending: deque[tuple[Any, Chunk]] = deque()  # sends in flight, their chunks' views held
        try:
            for chunk in chunks:
                if chunk.length:
                    views = source.views(chunk)
                    try:
                        work = group.send([_joined(views)], CLIENT_RANK, 0)
                    except BaseException:
                        source.release(chunk)
                        raise
                    pending.append((work, chunk))
                if len(pending) >= WINDOW:
                    _sent(pending.popleft(), source, conn.peer)
            while pending:
                _sent(pending.popleft(), source, conn.peer)
            conn.expect(p.Done)
        finally:
            _shutdown(group)

    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        setup = conn.expect(p.ProcessGroupSetup)
        if setup.backend != self.name:
            raise ProtocolError(f"{conn.peer} set up a {setup.backend} group, not {self.name}")
        host, local_host = conn.sock.getpeername()[0], conn.sock.getsockname()[0]
        store = dist.TCPStore(  # type: ignore[attr-defined]
            host, setup.port, 2, False, timeout=datetime.timedelta(seconds=timeouts.stall)
        )
        group = _group(self.name, store, CLIENT_RANK, local_host, timeouts.stall)
        try:
            pending: deque[tuple[Any, Chunk, Callable[[], None]]] = deque()
            for chunk in chunks:
                work, scatter = None, _nothing
                if chunk.length:
                    into, scatter = _receiving(sink.landing(chunk).views)
                    work = group.recv([into], SERVER_RANK, 0)
                pending.append((work, chunk, scatter))
                if len(pending) >= WINDOW:
                    _finish(pending.popleft(), sink, conn.peer)
            while pending:
                _finish(pending.popleft(), sink, conn.peer)
            conn.send(p.Done())
        finally:
            _shutdown(group)


def _sent(sending: tuple[Any, Chunk], source: ChunkSource, peer: str) -> None:
    """Wait for a chunk's send, then give back its views."""
    work, chunk = sending
    try:
        _wait(work, peer)
    finally:
        source.release(chunk)


def _joined(views: list[memoryview]) -> torch.Tensor:
    """A chunk's bytes as one tensor: its piece's memory, or its pieces copied together."""
    data = views[0] if len(views) == 1 else memoryview(bytearray(b"".join(views)))
    return torch.frombuffer(data, dtype=torch.uint8)


def _receiving(views: list[memoryview]) -> tuple[torch.Tensor, Callable[[], None]]:
    """Where a chunk is received (its piece's memory, or one buffer for all its pieces),
    and what then puts the bytes in place."""
    if len(views) == 1:
        return torch.frombuffer(views[0], dtype=torch.uint8), _nothing
    buffer = bytearray(sum(len(v) for v in views))

    def scatter() -> None:
        position = 0
        for view in views:
            view[:] = buffer[position : position + len(view)]
            position += len(view)

    return torch.frombuffer(buffer, dtype=torch.uint8), scatter


def _nothing() -> None:
    return None


def _finish(item: tuple[Any, Chunk, Callable[[], None]], sink: ChunkSink, peer: str) -> None:
    work, chunk, scatter = item
    if work is not None:
        _wait(work, peer)
    scatter()
    sink.received(chunk, source=peer)


def _shutdown(group: Any) -> None:
    try:
        if hasattr(group, "shutdown"):
            group.shutdown()
    except RuntimeError:
        pass


GLOO = ProcessGroupTransport("gloo", frozenset({"cpu"}))
