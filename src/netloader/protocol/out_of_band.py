"""The messages of the transports whose chunk bytes do not travel as DATA frames: a
process group (GLOO), the same-host read of the server's memory (SAME_HOST_*), NIXL, and
CUDA IPC (CUDA_IPC_*, accepted or declined with the same-host answers), with the chunk
addresses the last three read from and the client's DONE that ends them.
Each names things a hostile server could abuse (ports, sockets, addresses, metadata for
a C++ loader), so their decoders bound every field."""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from netloader.errors import ProtocolError
from netloader.manifest import MAX_PIECES
from netloader.protocol.body import MAX_ERROR_TEXT, Message, nonce_field, typed_field
from netloader.protocol.frames import MsgType

SOCKET_NAME = re.compile(r"netloader-[0-9a-f]{16,64}")
MAX_ADDRESS = (1 << 64) - 1
MAX_NIXL_METADATA = 6 << 20  # grows with the regions registered (one per tensor)
MAX_IPC_HANDLE = 1024  # bytes of a CUDA IPC memory handle (64 for cudaIpcMemHandle_t)
MAX_IPC_NAME = 256  # bytes of torch's reference-counter name (a shared-memory file)
MAX_DEVICES = 64  # GPUs an offer may name
REF_COUNTER_SLOTS = 10000  # torch's CUDA_IPC_REF_COUNTER_FILE_SIZE: offsets below it
DEVICE_UUID = re.compile(r"[0-9A-Za-z-]{1,64}")
# torch's reference-counter files: shm_open names, "/torch_<pid>_<n>_<n>" (no path parts).
IPC_NAME = re.compile(rb"/?[0-9A-Za-z_.-]{1,200}")


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


def _hex_bytes(body: dict[str, Any], name: str, limit: int) -> bytes:
    text = typed_field(body, name, str)
    if len(text) > 2 * limit:
        raise ProtocolError(f"field {name!r} is longer than {limit} bytes")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"field {name!r} is not hex") from None


def _bounded_int(body: dict[str, Any], name: str, high: int = MAX_ADDRESS) -> int:
    value = typed_field(body, name, int)
    if not 0 <= value <= high:
        raise ProtocolError(f"field {name!r} must be in [0, {high}]")
    return int(value)


class CudaIpcStorage(NamedTuple):
    """A CUDA allocation exported for IPC, as torch exports a storage
    (`UntypedStorage._share_cuda_`): plain bytes and integers, never pickled. `device`
    indexes the offer's `devices`; `handle` is the memory handle, `size` the storage's
    bytes, `offset` its offset in the allocation; `ref_counter`/`ref_offset` name the
    exporter's reference count (a shared-memory file) that keeps the allocation alive while
    it is open; `event`/`event_sync`: the event to wait for before reading."""

    device: int
    handle: bytes
    size: int
    offset: int
    ref_counter: bytes
    ref_offset: int
    event: bytes
    event_sync: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "handle": self.handle.hex(),
            "size": self.size,
            "offset": self.offset,
            "ref_counter": self.ref_counter.hex(),
            "ref_offset": self.ref_offset,
            "event": self.event.hex(),
            "event_sync": self.event_sync,
        }

    def unsendable(self) -> str | None:
        """Why the other side would refuse this export as malformed (a handle or name
        beyond the bounds); None if it is within them. The exporter checks first and
        falls back instead."""
        if len(self.handle) > MAX_IPC_HANDLE or len(self.event) > MAX_IPC_HANDLE:
            return f"a CUDA IPC handle is longer than {MAX_IPC_HANDLE} bytes"
        if not IPC_NAME.fullmatch(self.ref_counter) or self.ref_offset >= REF_COUNTER_SLOTS:
            return "torch's CUDA IPC reference counter is not of the expected form"
        return None

    @classmethod
    def from_json(cls, body: Any) -> CudaIpcStorage:
        if not isinstance(body, dict):
            raise ProtocolError("a CUDA IPC storage must be an object")
        ref_counter = _hex_bytes(body, "ref_counter", MAX_IPC_NAME)
        if not IPC_NAME.fullmatch(ref_counter):
            raise ProtocolError("malformed CUDA IPC reference-counter name")
        return cls(
            _bounded_int(body, "device", MAX_DEVICES - 1),
            _hex_bytes(body, "handle", MAX_IPC_HANDLE),
            _bounded_int(body, "size"),
            _bounded_int(body, "offset"),
            ref_counter,
            _bounded_int(body, "ref_offset", REF_COUNTER_SLOTS - 1),
            _hex_bytes(body, "event", MAX_IPC_HANDLE),
            typed_field(body, "event_sync", bool),
        )


@dataclass(frozen=True)
class CudaIpcOffer(Message):
    """Server: the FETCH's chunks can be copied straight out of its device memory with CUDA
    IPC, if the client is on this host (`boot_id`), connected directly (`peer`: its
    address as the server sees it), sees the server's GPUs (`devices`: their UUIDs) and
    may open its memory: `probe` is a device buffer holding `token`, which the client
    opens and reads. A non-empty `reason` says why the server cannot offer it (the other
    fields are then empty): the client declines and takes DATA frames."""

    TYPE: ClassVar[MsgType] = MsgType.CUDA_IPC_OFFER
    boot_id: str
    peer: str
    devices: tuple[str, ...]
    token: bytes
    probe: CudaIpcStorage | None
    reason: str = ""

    @classmethod
    def refused(cls, reason: str) -> CudaIpcOffer:
        return cls("", "", (), b"", None, reason[:MAX_ERROR_TEXT] or "refused")

    def body(self) -> dict[str, Any]:
        if self.reason:
            return {"reason": self.reason[:MAX_ERROR_TEXT]}
        assert self.probe is not None
        return {
            "boot_id": self.boot_id,
            "peer": self.peer,
            "devices": list(self.devices),
            "token": self.token.hex(),
            "probe": self.probe.to_json(),
        }

    @classmethod
    def decode(cls, body: dict[str, Any]) -> CudaIpcOffer:
        if "reason" in body:
            reason = typed_field(body, "reason", str)[:MAX_ERROR_TEXT]
            return cls.refused(reason)
        boot_id, peer = typed_field(body, "boot_id", str), typed_field(body, "peer", str)
        devices = typed_field(body, "devices", list)
        if (
            len(boot_id) > 64
            or len(peer) > 300
            or not 0 < len(devices) <= MAX_DEVICES
            or not all(isinstance(d, str) and DEVICE_UUID.fullmatch(d) for d in devices)
        ):
            raise ProtocolError("malformed CUDA IPC offer")
        probe = CudaIpcStorage.from_json(body.get("probe"))
        if probe.device >= len(devices):
            raise ProtocolError("CUDA IPC offer's probe names no offered device")
        return cls(boot_id, peer, tuple(devices), nonce_field(body, "token"), probe)


@dataclass(frozen=True)
class CudaIpcTensor(Message):
    """Server: the manifest's tensor `tensor` lies in `storage` from byte `start` on (its
    chunks' CHUNK_ADDRESS then name each piece's byte offset in that storage)."""

    TYPE: ClassVar[MsgType] = MsgType.CUDA_IPC_TENSOR
    tensor: int
    storage: CudaIpcStorage
    start: int

    def body(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "storage": self.storage.to_json(), "start": self.start}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> CudaIpcTensor:
        return cls(
            _bounded_int(body, "tensor"),
            CudaIpcStorage.from_json(body.get("storage")),
            _bounded_int(body, "start"),
        )
