"""What every transport is: an object that moves a list of chunks from a server to a
client once the handshake is done, through the same framed control connection, knowing
nothing of manifests beyond the chunks it is handed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol

import torch

from netloader.manifest import Chunk
from netloader.settings import Timeouts
from netloader.transports.connection import Connection


class ChunkSource(Protocol):
    """Server side: the bytes of a chunk, as a 1-D uint8 tensor (a view where possible)."""

    def chunk_bytes(self, chunk: Chunk) -> torch.Tensor: ...

    def region(self, chunk: Chunk) -> torch.Tensor:
        """The host memory the chunk's whole tensor lives in (flat uint8), once the chunk is
        held (a transport registers it)."""
        ...


class ChunkSink(Protocol):
    """Client side: where a chunk's bytes go, and the check once they are there."""

    def destination(self, chunk: Chunk) -> torch.Tensor: ...

    def received(self, chunk: Chunk, arrived: str | None = None, source: str | None = None) -> None:
        """Verify the chunk (raise IntegrityError naming `source`) and record it as
        complete. `arrived` is the digest of the bytes as they arrived, where the transport
        computed it on the way; otherwise the sink hashes the destination."""


ChunkList = Sequence[Chunk]


class Transport(ABC):
    """One way of moving chunk bytes. `name` is what FETCH, the TRANSPORT config field and
    the CLI call it; `tls` says whether TLS on the control connection covers the bytes;
    `memory` lists the device types whose memory it reads and writes directly (others are
    staged through host memory)."""

    name: str
    tls: bool
    memory: frozenset[str]

    def unavailable(self) -> str | None:
        """Why this process cannot use the transport (a missing optional package); None
        if it can."""
        return None

    def for_connection(self, conn: Connection) -> Transport:
        """The transport to ask `conn`'s server for (one that fell back on this connection
        names the one it fell back to)."""
        return self

    @abstractmethod
    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        """Server: send `chunks` (the FETCH was already read)."""

    @abstractmethod
    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        """Client: receive `chunks` into `sink`, each verified (the FETCH was sent)."""
