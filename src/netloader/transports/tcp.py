"""Tensor bytes as DATA frames on the control connection itself: one socket, no setup,
covered by TLS when the connection uses it, and a corrupting middlebox is caught by the
per-chunk digests."""

from __future__ import annotations

from netloader import protocol as p
from netloader.errors import ProtocolError
from netloader.manifest import Chunk, new_hasher
from netloader.settings import Timeouts
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.connection import Connection


class TcpTransport(Transport):
    name = "tcp"
    tls = True
    memory = frozenset({"cpu"})

    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        for chunk in chunks:
            views = source.views(chunk)
            try:
                with conn.within(timeouts.for_chunk(chunk.length), f"sending chunk {chunk.number}"):
                    conn.send_data(chunk.number, views)
            finally:
                source.release(chunk)
        conn.send(p.End())

    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        for chunk in chunks:
            with conn.within(timeouts.for_chunk(chunk.length), f"chunk {chunk.number}"):
                self._receive_one(conn, chunk, sink)
        conn.expect(p.End)

    def _receive_one(self, conn: Connection, chunk: Chunk, sink: ChunkSink) -> None:
        header = conn.recv_header()
        if header.type is not p.MsgType.DATA:
            conn.message_from(header)  # raises if it is the peer's ERROR
            raise ProtocolError(f"{conn.peer} sent {header.type.name} where tensor data belongs")
        index = p.decode_data_prefix(conn.recv_exact(p.DATA_PREFIX.size))
        length = header.length - p.DATA_PREFIX.size
        if (index, length) != (chunk.number, chunk.length):
            raise ProtocolError(
                f"{conn.peer} sent chunk {index} of {length} bytes, "
                f"expected chunk {chunk.number} of {chunk.length}"
            )
        hasher = new_hasher()
        conn.recv_views(sink.landing(chunk).views, hasher)
        conn.session.data_received()
        sink.received(chunk, hasher.hexdigest(), conn.peer)


TCP = TcpTransport()
