"""The messages of the transports whose chunk bytes do not travel as DATA frames: a
process group (GLOO), the same-host read of the server's memory (SAME_HOST_*), and NIXL,
with the chunk addresses the last two read from and the client's DONE that ends them.
Each names things a hostile server could abuse (ports, sockets, addresses, metadata for
a C++ loader), so their decoders bound every field."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from netloader.errors import ProtocolError
from netloader.manifest import MAX_PIECES
from netloader.protocol.body import MAX_ERROR_TEXT, Message, nonce_field, typed_field
from netloader.protocol.frames import MsgType

SOCKET_NAME = re.compile(r"netloader-[0-9a-f]{16,64}")
MAX_ADDRESS = (1 << 64) - 1
MAX_NIXL_METADATA = 6 << 20  # grows with the regions registered (one per tensor)


def _address(body: dict[str, Any], name: str) -> int:
    value = typed_field(body, name, int)
    if not 0 <= value <= MAX_ADDRESS:
        raise ProtocolError(f"field {name!r} is not a 64-bit address")
    return int(value)


@dataclass(frozen=True)
class ProcessGroupSetup(Message):
    """Server: the chunks come over a process group; rendezvous at this TCPStore port."""

    TYPE: ClassVar[MsgType] = MsgType.GLOO
    port: int
    backend: str

    def body(self) -> dict[str, Any]:
        return {"port": self.port, "backend": self.backend}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ProcessGroupSetup:
        port = typed_field(body, "port", int)
        if not 0 < port < 65536:
            raise ProtocolError(f"process-group setup names port {port}")
        return cls(port, typed_field(body, "backend", str))


@dataclass(frozen=True)
class Done(Message):
    """Client: every chunk received over the process group is verified."""

    TYPE: ClassVar[MsgType] = MsgType.DONE


@dataclass(frozen=True)
class SameHostOffer(Message):
    """Server: the FETCH's chunks can be read straight from this process's memory, if the
    client is on this host (`boot_id`), connected directly (`peer`: its address as the
    server sees it), and the kernel lets it read: it connects to the abstract Unix socket
    `socket` and sends `token`, which the server also holds at `probe` for a test read."""

    TYPE: ClassVar[MsgType] = MsgType.SAME_HOST_OFFER
    boot_id: str
    peer: str
    socket: str
    token: bytes
    probe: int

    def body(self) -> dict[str, Any]:
        return {
            "boot_id": self.boot_id,
            "peer": self.peer,
            "socket": self.socket,
            "token": self.token.hex(),
            "probe": self.probe,
        }

    @classmethod
    def decode(cls, body: dict[str, Any]) -> SameHostOffer:
        boot_id, peer = typed_field(body, "boot_id", str), typed_field(body, "peer", str)
        name = typed_field(body, "socket", str)
        if len(boot_id) > 64 or len(peer) > 300 or not SOCKET_NAME.fullmatch(name):
            raise ProtocolError("malformed same-host offer")
        return cls(boot_id, peer, name, nonce_field(body, "token"), _address(body, "probe"))


@dataclass(frozen=True)
class SameHostAccept(Message):
    """Client: it read the probe; send the chunks' addresses."""

    TYPE: ClassVar[MsgType] = MsgType.SAME_HOST_ACCEPT


@dataclass(frozen=True)
class SameHostDecline(Message):
    """Client: it cannot read this server's memory (`reason`): send DATA frames instead."""

    TYPE: ClassVar[MsgType] = MsgType.SAME_HOST_DECLINE
    reason: str

    def body(self) -> dict[str, Any]:
        return {"reason": self.reason[:MAX_ERROR_TEXT]}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> SameHostDecline:
        return cls(typed_field(body, "reason", str)[:MAX_ERROR_TEXT])


@dataclass(frozen=True)
class ChunkAddress(Message):
    """Server: chunk `chunk`'s pieces are at `addresses` in its memory, in order (until
    DONE), for the client to read (same-host, nixl)."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK_ADDRESS
    chunk: int
    addresses: tuple[int, ...]

    def body(self) -> dict[str, Any]:
        return {"chunk": self.chunk, "addresses": list(self.addresses)}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ChunkAddress:
        chunk = typed_field(body, "chunk", int)
        addresses = typed_field(body, "addresses", list)
        if len(addresses) > MAX_PIECES or not all(
            type(a) is int and 0 <= a <= MAX_ADDRESS for a in addresses
        ):
            raise ProtocolError(
                f"CHUNK_ADDRESS must name at most {MAX_PIECES} pieces, each at a 64-bit address"
            )
        return cls(chunk, tuple(addresses))


@dataclass(frozen=True)
class NixlSetup(Message):
    """Server: read the chunks with NIXL from agent `agent`, whose metadata (NIXL's own
    serialisation, loaded by NIXL's C++ side, never unpickled) is `metadata`."""

    TYPE: ClassVar[MsgType] = MsgType.NIXL_SETUP
    agent: str
    metadata: bytes

    def body(self) -> dict[str, Any]:
        return {"agent": self.agent, "metadata": base64.b64encode(self.metadata).decode()}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> NixlSetup:
        agent, text = typed_field(body, "agent", str), typed_field(body, "metadata", str)
        if not SOCKET_NAME.fullmatch(agent) or len(text) > MAX_NIXL_METADATA * 4 // 3 + 4:
            raise ProtocolError("malformed nixl setup")
        try:
            metadata = base64.b64decode(text, validate=True)
        except ValueError:
            raise ProtocolError("nixl metadata is not base64") from None
        return cls(agent, metadata)
