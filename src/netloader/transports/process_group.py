"""Tensor bytes over a 2-rank torch.distributed process group built without the global
default group (the seed system's design): gloo between host memories, NCCL between GPUs.

The control connection carries the rendezvous: the server opens a TCPStore on a free port
of the address the client reached it on, sends GLOO{port}, and both build the group; the
client confirms with DONE once every chunk is verified.
"""

from __future__ import annotations

import datetime
from collections import deque
from typing import Any

import torch.distributed as dist

from netloader import protocol as p
from netloader.connection import Connection
from netloader.errors import PeerClosed, ProtocolError, TransferTimeout
from netloader.transports import ChunkList, ChunkSink, ChunkSource

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
    if backend == "nccl":
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = delta
        return dist.ProcessGroupNCCL(prefixed, rank, 2, nccl_opts)
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


def send_chunks(
    conn: Connection, source: ChunkSource, chunks: ChunkList, *, backend: str, timeout: float
) -> None:
    local_host = conn.sock.getsockname()[0]
    store = dist.TCPStore(  # type: ignore[attr-defined]
        local_host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False
    )
    conn.send(p.encode(p.MsgType.GLOO, {"port": store.port, "backend": backend}))
    group = _group(backend, store, SERVER_RANK, local_host, timeout)
    try:
        pending: deque[Any] = deque()
        for chunk in chunks:
            if chunk.length:
                pending.append(group.send([source.chunk_bytes(chunk)], CLIENT_RANK, 0))
            if len(pending) >= WINDOW:
                _wait(pending.popleft(), conn.peer)
        while pending:
            _wait(pending.popleft(), conn.peer)
        conn.recv_message(p.MsgType.DONE)
    finally:
        _shutdown(group)


def receive_chunks(
    conn: Connection, chunks: ChunkList, sink: ChunkSink, *, backend: str, timeout: float
) -> None:
    _, body = conn.recv_message(p.MsgType.GLOO)
    port = body.get("port")
    if not isinstance(port, int) or not 0 < port < 65536 or body.get("backend") != backend:
        raise ProtocolError(f"{conn.peer} sent an invalid GLOO setup: {body!r}")
    host, local_host = conn.sock.getpeername()[0], conn.sock.getsockname()[0]
    store = dist.TCPStore(  # type: ignore[attr-defined]
        host, port, 2, False, timeout=datetime.timedelta(seconds=timeout)
    )
    group = _group(backend, store, CLIENT_RANK, local_host, timeout)
    try:
        pending: deque[tuple[Any, Any]] = deque()
        for chunk in chunks:
            if chunk.length:
                pending.append((group.recv([sink.destination(chunk)], SERVER_RANK, 0), chunk))
            else:
                pending.append((None, chunk))
            if len(pending) >= WINDOW:
                _finish(pending.popleft(), sink, conn.peer)
        while pending:
            _finish(pending.popleft(), sink, conn.peer)
        conn.send(p.encode(p.MsgType.DONE, {}))
    finally:
        _shutdown(group)


def _finish(item: tuple[Any, Any], sink: ChunkSink, peer: str) -> None:
    work, chunk = item
    if work is not None:
        _wait(work, peer)
    sink.received(chunk)


def _shutdown(group: Any) -> None:
    try:
        if hasattr(group, "shutdown"):
            group.shutdown()
    except RuntimeError:
        pass
