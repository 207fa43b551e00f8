"""What every transport is: an object that moves a list of chunks from a server to a
client once the handshake is done, through the same framed control connection, knowing
nothing of manifests beyond the chunks it is handed."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

from netloader.manifest import Chunk
from netloader.settings import Timeouts
from netloader.transports.connection import Connection


class Landing(NamedTuple):
    """Where a chunk's pieces land: one writable view per piece, in order, and the address
    of each (for transports that write memory themselves)."""

    views: list[memoryview]
    addresses: list[int]


class ChunkSource(Protocol):
    """Server side: a chunk's bytes in host memory, once it is held (and its turn under
    the send rate has come). The memory stays valid while the server serves."""

    def views(self, chunk: Chunk) -> list[memoryview]:
        """One view per piece, in order, valid until `release(chunk)` (a device tensor's
        piece is staged in a host buffer of a small ring until then)."""
        ...

    def release(self, chunk: Chunk) -> None:
        """The views of `chunk` are no longer needed (its host buffer, if any, is free)."""
        ...

    def addresses(self, chunk: Chunk) -> list[int]:
        """Each piece's address, in order (for a client that reads this memory itself)."""
        ...

    def regions(self, chunk: Chunk) -> list[torch.Tensor]:
        """The host memory (flat uint8) of each tensor the chunk's pieces lie in (a
        transport registers it)."""
        ...

    def tensors(self, chunk: Chunk) -> list[torch.Tensor]:
        """The tensor each of the chunk's pieces lies in, wherever it is (for a transport
        that reads device memory itself); its bytes count only once `ready(chunk)`."""
        ...

    def ready(self, chunk: Chunk) -> None:
        """Return once the chunk is held and its turn under the send rate has come (for a
        transport that names chunks without handing out their bytes)."""
        ...


class ChunkSink(Protocol):
    """Client side: where a chunk's pieces land, and the check once they are there."""

    def landing(self, chunk: Chunk) -> Landing: ...

    def received(self, chunk: Chunk, arrived: str | None = None, source: str | None = None) -> None:
        """Verify the chunk (raise IntegrityError naming `source`) and record it as
        complete. `arrived` is the digest of the bytes as they arrived, where the transport
        computed it on the way; otherwise the sink hashes what landed."""

    def device_targets(self, chunk: Chunk) -> list[torch.Tensor] | None:
        """Where each piece goes in device memory, for a transport that copies device to
        device (CUDA IPC); None where the chunk does not go straight to CUDA tensors."""

    def all_on_device(self) -> bool:
        """Whether every chunk to fetch has `device_targets` (TRANSPORT=auto then asks for
        CUDA IPC)."""

    def device_received(self, chunk: Chunk, arrived: str, source: str | None = None) -> None:
        """Verify a chunk copied into its `device_targets` by its device digest (`arrived`,
        computed on the device), and record it as complete; IntegrityError as `received`."""


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

    def for_connection(self, conn: Connection, sink: ChunkSink | None = None) -> Transport:
        """The transport to ask `conn`'s server for (one that fell back on this connection
        names the one it fell back to; "auto" chooses by where `sink`'s tensors are)."""
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
