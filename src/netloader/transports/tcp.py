"""Tensor bytes as DATA frames on the control connection itself: one socket, no setup,
and a corrupting middlebox is caught by the per-chunk digests."""

from __future__ import annotations

from netloader import protocol as p
from netloader.connection import Connection
from netloader.errors import ProtocolError
from netloader.manifest import new_hasher
from netloader.tensors import byte_view
from netloader.transports import ChunkList, ChunkSink, ChunkSource

NAME = "tcp"


def send_chunks(conn: Connection, source: ChunkSource, chunks: ChunkList) -> None:
    for chunk in chunks:
        data = source.chunk_bytes(chunk)
        conn.send(p.encode_data_header(chunk.tensor, chunk.number, chunk.length))
        conn.send(byte_view(data))
    conn.send(p.encode(p.MsgType.END, {}))


def receive_chunks(conn: Connection, chunks: ChunkList, sink: ChunkSink) -> None:
    for chunk in chunks:
        header = conn.recv_header()
        if header.type is not p.MsgType.DATA:
            conn.message_from(header)  # raises: the peer's ERROR, or a protocol violation
            raise ProtocolError(f"{conn.peer} sent {header.type.name} where tensor data belongs")
        tensor, index = p.decode_data_prefix(conn.recv_exact(p.DATA_PREFIX.size))
        if (tensor, index) != (chunk.tensor, chunk.number) or header.length != (
            p.DATA_PREFIX.size + chunk.length
        ):
            raise ProtocolError(
                f"{conn.peer} sent chunk {tensor}/{index} of {header.length - p.DATA_PREFIX.size} "
                f"bytes, expected {chunk.tensor}/{chunk.number} of {chunk.length}"
            )
        hasher = new_hasher()
        conn.recv_into(byte_view(sink.destination(chunk)), hasher)
        sink.received(chunk, hasher.hexdigest())
    conn.recv_message(p.MsgType.END)
