"""The part of the conversation shared by transports whose client reads the server's
memory itself (same-host, nixl): the server names each chunk's address as it holds it,
then END, and keeps that memory referenced until the client's DONE."""

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
    """Server: name every chunk's address (waiting for it and for the send rate), END,
    then wait, bounded by the chunks' size, for the client's DONE."""
    held = []  # every chunk's memory stays referenced until the client is done
    for chunk in chunks:
        data = source.chunk_bytes(chunk)
        held.append(data)
        conn.send(p.ChunkAddress(chunk.tensor, chunk.number, data.data_ptr()))
    conn.send(p.End())
    with conn.within(timeouts.for_chunk(sum(c.length for c in chunks)), "the client's reads"):
        conn.expect(p.Done)


def expect_address(conn: Connection, chunk: Chunk, timeouts: Timeouts) -> int:
    """Client: the address the server names for `chunk`, next, within the chunk's time."""
    with conn.within(timeouts.for_chunk(chunk.length), f"chunk {chunk.tensor}/{chunk.number}"):
        named = conn.expect(p.ChunkAddress)
    if (named.tensor, named.chunk) != (chunk.tensor, chunk.number):
        raise ProtocolError(
            f"{conn.peer} named chunk {named.tensor}/{named.chunk}, "
            f"expected {chunk.tensor}/{chunk.number}"
        )
    return named.address
