"""The part of the conversation shared by transports whose client reads the server's
memory itself (same-host, nixl): the server names the addresses of each chunk's pieces
as it holds them, then END, and waits for the client's DONE. The memory stays referenced
by the server's holdings, which a conversation keeps for its whole life."""

from __future__ import annotations

from netloader import protocol as p
from netloader.errors import ProtocolError
from netloader.manifest import Chunk
from netloader.settings import Timeouts
from netloader.transports.base import ChunkList, ChunkSource
from netloader.transports.connection import Connection


def send_addresses(
    conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
) -> None:
    """Server: name every chunk's pieces' addresses (waiting for the chunk and for the send
    rate), END, then wait, bounded by the chunks' size, for the client's DONE."""
    for chunk in chunks:
        conn.send(p.ChunkAddress(chunk.number, tuple(source.addresses(chunk))))
    conn.send(p.End())
    with conn.within(timeouts.for_chunk(sum(c.length for c in chunks)), "the client's reads"):
        conn.expect(p.Done)


def expect_addresses(conn: Connection, chunk: Chunk, timeouts: Timeouts) -> tuple[int, ...]:
    """Client: the addresses the server names for `chunk`'s pieces, next, within the
    chunk's time."""
    with conn.within(timeouts.for_chunk(chunk.length), f"chunk {chunk.number}"):
        named = conn.expect(p.ChunkAddress)
    if named.chunk != chunk.number or len(named.addresses) != len(chunk.pieces):
        raise ProtocolError(
            f"{conn.peer} named {len(named.addresses)} addresses of chunk {named.chunk}, "
            f"expected {len(chunk.pieces)} of chunk {chunk.number}"
        )
    return named.addresses
