"""Moving bytes. Each transport is one object in `REGISTRY`; the configuration's allowed
values, the CLI's choices and the server's dispatch all come from it, so a new transport is
one module plus one line below."""

from __future__ import annotations

from netloader.errors import UsageError
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.process_group import GLOO, NCCL
from netloader.transports.tcp import TCP

REGISTRY: dict[str, Transport] = {t.name: t for t in (TCP, GLOO, NCCL)}
DEFAULT = TCP.name  # chosen by measurement: see README, "Benchmark"
AUTO = "auto"  # the configuration's word for DEFAULT


def names() -> tuple[str, ...]:
    """Every value TRANSPORT / --transport accepts."""
    return (AUTO, *REGISTRY)


def get(name: str) -> Transport:
    """The transport called `name` ("auto": the default); UsageError if there is none."""
    transport = REGISTRY.get(DEFAULT if name == AUTO else name)
    if transport is None:
        raise UsageError(f"unknown transport {name!r}; known: {', '.join(names())}")
    return transport


__all__ = [
    "AUTO",
    "DEFAULT",
    "REGISTRY",
    "ChunkList",
    "ChunkSink",
    "ChunkSource",
    "Transport",
    "get",
    "names",
]
