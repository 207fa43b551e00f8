"""A TCP proxy for fault injection between a client and a real server: it can throttle,
flip one byte, freeze, hang up (cleanly or with a reset) at a given offset, record, or
report how many bytes went by (server -> client direction).

    slow = FaultyProxy(server.address, rate=8 << 20)   # "host:port" or (host, port)
    Client([slow.address]).load_into(...)
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time


def host_port(address: str | tuple[str, int]) -> tuple[str, int]:
    """(host, port) of "host:port", "[v6]:port" or an Endpoint."""
    if isinstance(address, str):
        host, port = address.rsplit(":", 1)
        return host.strip("[]"), int(port)
    return address[0], address[1]


class FaultyProxy:
    def __init__(
        self,
        upstream: str | tuple[str, int],
        *,
        flip_at: int | None = None,
        freeze_after: int | None = None,
        rate: float | None = None,
        cut_at: int | None = None,
        reset: bool = False,
        once: bool = False,
        record: bool = False,
    ) -> None:
        self.upstream = host_port(upstream)
        self.flip_at = flip_at  # offset in the server->client stream whose byte is inverted
        self.freeze_after = freeze_after  # stop forwarding (but keep sockets open) after this
        self.rate = rate  # bytes per second, server->client
        self.cut_at = cut_at  # end both connections once this many bytes went downstream
        self.reset = reset  # ... with a TCP reset instead of a clean close
        self.once = once  # ... and let the connections after that through untouched
        self.recorded = bytearray() if record else None
        self.cut = False
        self.forwarded = 0
        self.frozen = False
        self.closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:  # the server is gone: so is this connection
                client.close()
                continue
            self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, downstream: bool) -> None:
        try:
            while not self.closed.is_set():
                data = bytearray(src.recv(1 << 16))
                if not data:
                    break
                if downstream:
                    data = self._tamper(data)
                dst.sendall(data)
                if downstream and self.cut:
                    self._hang_up(src, dst)
                    if self.once:
                        self.cut_at, self.cut = None, False
                    return
                if downstream and self.frozen:
                    self.closed.wait()  # hold both sockets open, silent, like a frozen peer
                    return
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _tamper(self, data: bytearray) -> bytearray:
        start = self.forwarded
        if self.freeze_after is not None and start + len(data) >= self.freeze_after:
            data = data[: self.freeze_after - start]
            self.frozen = True
        if self.cut_at is not None and start + len(data) >= self.cut_at:
            data = data[: self.cut_at - start]
            self.cut = True
        if self.flip_at is not None and start <= self.flip_at < start + len(data):
            data[self.flip_at - start] ^= 0xFF
        self.forwarded += len(data)
        if self.recorded is not None:
            self.recorded += data
        if self.rate:
            time.sleep(len(data) / self.rate)
        return data

    def _hang_up(self, *sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                if self.reset:  # linger 0: the final close sends RST; SHUT_RD wakes readers
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    s.shutdown(socket.SHUT_RD)
                else:
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.closed.set()
        self._listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()
