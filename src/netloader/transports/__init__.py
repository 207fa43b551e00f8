"""Moving bytes. Each transport is one object in `REGISTRY`; the configuration's allowed
values, the CLI's choices and the server's dispatch all come from it, so a new transport is
one module plus one line below."""

from __future__ import annotations

from netloader.errors import UsageError
from netloader.transports import cuda_ipc, same_host
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.nixl import NIXL
from netloader.transports.process_group import GLOO
from netloader.transports.tcp import TCP

REGISTRY: dict[str, Transport] = {
    t.name: t for t in (TCP, same_host.SAME_HOST, GLOO, NIXL, cuda_ipc.CUDA_IPC)
}
AUTO = "auto"  # cuda-ipc or same-host where client and server share a host, else tcp: README


def names() -> tuple[str, ...]:
    """Every value TRANSPORT / --transport accepts."""
    return (AUTO, *REGISTRY)


def get(name: str) -> Transport:
    """The transport called `name` ("auto": cuda-ipc or same-host where it can, else tcp);
    UsageError if there is none."""
    transport = cuda_ipc.AUTO if name == AUTO else REGISTRY.get(name)
    if transport is None:
        raise UsageError(f"unknown transport {name!r}; known: {', '.join(names())}")
    return transport


__all__ = [
    "AUTO",
    "REGISTRY",
    "ChunkList",
    "ChunkSink",
    "ChunkSource",
    "Transport",
    "get",
    "names",
]
