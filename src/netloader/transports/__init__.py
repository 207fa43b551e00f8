"""Moving chunk bytes between a server and a client, once the handshake is done.

Each transport has a `send_chunks` (server side) and a `receive_chunks` (client side);
both sides speak through the same framed control connection, and neither knows about
manifests beyond the chunks it is handed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from netloader.manifest import Chunk


class ChunkSource(Protocol):
    """Server side: the bytes of a chunk, as a 1-D uint8 tensor (a view where possible)."""

    def chunk_bytes(self, chunk: Chunk) -> torch.Tensor: ...


class ChunkSink(Protocol):
    """Client side: where a chunk's bytes go, and the check once they are there."""

    def destination(self, chunk: Chunk) -> torch.Tensor: ...

    def received(self, chunk: Chunk, arrived: str | None = None) -> None:
        """Verify the chunk (raise IntegrityError) and record it as complete. `arrived` is
        the digest of the bytes as they arrived, where the transport computed it on the
        way; otherwise the sink hashes the destination."""


ChunkList = Sequence[Chunk]
