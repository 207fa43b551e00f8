"""The wire format, free of I/O: one typed class per message, its encoding, and decoders
that validate untrusted bytes and raise ProtocolError for anything malformed. Nothing is
unpickled.

Every frame starts with a fixed 16-byte header: magic b"NLDR", a type byte, 3 zero bytes,
and the body length (u64, big-endian). Control bodies are JSON objects with a per-type size
bound. A DATA body is an 8-byte prefix (tensor index u32, chunk index u32) followed by the
chunk's raw bytes, which the I/O layer reads straight into tensor memory. Which message
may come when is `session.py`'s business. (Over 400 lines because it holds one small class
per message type, which read best side by side.)
"""

from __future__ import annotations

import base64
import json
import re
import struct
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, ClassVar

from netloader.errors import (
    AuthenticationError,
    ProtocolError,
    RemoteError,
    ServerBusy,
    SourceUnavailable,
    TransferError,
    VersionMismatch,
)
from netloader.manifest import Manifest

# 2: control frames after an authenticated handshake carry a tag; 3: GET_MANIFEST names a
# part; 4: the same-host transport's messages
PROTOCOL_VERSION = 4
MAGIC = b"NLDR"
HEADER = struct.Struct("!4sB3xQ")
DATA_PREFIX = struct.Struct("!II")
NONCE_BYTES = 32
MAX_DATA_BYTES = 1 << 32
MAX_ERROR_TEXT = 2000
TAG_BYTES = 32  # HMAC-SHA256 session tag after a control body (session.py)


class MsgType(IntEnum):
    HELLO = 1
    WELCOME = 2
    AUTH = 3
    GET_MANIFEST = 4
    MANIFEST = 5
    FETCH = 6
    DATA = 7
    END = 8
    GLOO = 9
    DONE = 10
    ERROR = 11
    BYE = 12
    SAME_HOST_OFFER = 13
    SAME_HOST_ACCEPT = 14
    SAME_HOST_DECLINE = 15
    CHUNK_ADDRESS = 16
    NIXL_SETUP = 17


# Largest body each type may claim: a peer cannot make us allocate more than this.
SMALL_BODY = 64 << 10
MAX_BODY: dict[MsgType, int] = {t: SMALL_BODY for t in MsgType}
MAX_BODY[MsgType.MANIFEST] = 256 << 20
MAX_BODY[MsgType.FETCH] = 64 << 20
MAX_BODY[MsgType.DATA] = DATA_PREFIX.size + MAX_DATA_BYTES


class ErrorCode(Enum):
    """Why a peer refused, as carried by an ERROR frame; each maps to the exception the
    other side raises."""

    VERSION = "version"
    AUTH = "auth"
    UNAVAILABLE = "unavailable"
    BUSY = "busy"
    BAD_REQUEST = "bad_request"
    INTERNAL = "internal"
    UNKNOWN = "unknown"  # a code this version does not know

    @property
    def exception(self) -> type[TransferError]:
        return _EXCEPTIONS.get(self, RemoteError)


_EXCEPTIONS: dict[ErrorCode, type[TransferError]] = {
    ErrorCode.VERSION: VersionMismatch,
    ErrorCode.AUTH: AuthenticationError,
    ErrorCode.UNAVAILABLE: SourceUnavailable,
    ErrorCode.BUSY: ServerBusy,
}


@dataclass(frozen=True)
class FrameHeader:
    type: MsgType
    length: int


def decode_header(data: bytes) -> FrameHeader:
    """Validate a frame header: magic, a known type, a body within that type's bound."""
    if len(data) != HEADER.size:
        raise ProtocolError(f"frame header must be {HEADER.size} bytes, got {len(data)}")
    magic, kind, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a netloader peer (frame starts with {magic!r})")
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    if length > MAX_BODY[msg_type] + TAG_BYTES:
        raise ProtocolError(f"{msg_type.name} body of {length} bytes exceeds {MAX_BODY[msg_type]}")
    if msg_type is MsgType.DATA and length < DATA_PREFIX.size:
        raise ProtocolError("DATA frame shorter than its prefix")
    return FrameHeader(msg_type, length)


# Most JSON arrays and objects a body may hold, by type (a manifest's and a FETCH's depend
# on the model: the sessions tighten them). Counted before parsing, because parsing is
# where a hostile body costs memory: 256 MiB of "{}," is 85 million dicts.
MAX_CONTAINERS: dict[MsgType, int] = {t: 8 for t in MsgType}
MAX_CONTAINERS[MsgType.MANIFEST] = 4 + 3 * 1_000_000  # top, identity, attributes; 3 per tensor
MAX_CONTAINERS[MsgType.FETCH] = 2 + (MAX_BODY[MsgType.FETCH] // 6)


def containers_within(data: bytes, limit: int) -> bool:
    """Whether `data` opens at most `limit` arrays and objects (brackets inside strings
    count too: a conservative over-estimate, with slack for them)."""
    return data.count(b"[") + data.count(b"{") <= limit + len(data) // 256


def decode_body(
    data: bytes, max_containers: int | None = MAX_CONTAINERS[MsgType.HELLO]
) -> dict[str, Any]:
    """A control body: one JSON object holding at most `max_containers` arrays/objects
    (None: the caller has bounded it already)."""
    if max_containers is not None and not containers_within(data, max_containers):
        raise ProtocolError(f"control message holds more than {max_containers} arrays/objects")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a JSON object")
    return body


def encode_data_header(tensor: int, chunk: int, length: int) -> bytes:
    """Header and prefix of a DATA frame; the chunk's `length` raw bytes follow."""
    return HEADER.pack(MAGIC, MsgType.DATA, DATA_PREFIX.size + length) + DATA_PREFIX.pack(
        tensor, chunk
    )


def decode_data_prefix(data: bytes) -> tuple[int, int]:
    tensor, chunk = DATA_PREFIX.unpack(data)
    return tensor, chunk


def encode(kind: MsgType, body: dict[str, Any]) -> bytes:
    """A control frame from its type and JSON body (the typed classes use this)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, kind, len(payload)) + payload


# ---- typed messages ---------------------------------------------------------------------


class Message:
    """A control message: `TYPE` on the wire, `body()` its JSON, `decode` the way back."""

    TYPE: ClassVar[MsgType]

    def body(self) -> dict[str, Any]:
        return {}

    def encode(self) -> bytes:
        return encode(self.TYPE, self.body())

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Message:
        return cls()


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {name!r} missing or of the wrong type")
    return value


def _nonce(body: dict[str, Any], name: str) -> bytes:
    text = _field(body, name, str)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"field {name!r} is not hex") from None
    if len(value) != NONCE_BYTES:
        raise ProtocolError(f"field {name!r} must be {NONCE_BYTES} bytes")
    return value


def _proof(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128 or not value.isascii():
        raise ProtocolError("field 'proof' must be a short ASCII string or null")
    return value


@dataclass(frozen=True)
class Hello(Message):
    """Client, first: its protocol version and a fresh nonce."""

    TYPE: ClassVar[MsgType] = MsgType.HELLO
    protocol: int
    nonce: bytes

    def body(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "nonce": self.nonce.hex()}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Hello:
        return cls(_field(body, "protocol", int), _nonce(body, "nonce"))


@dataclass(frozen=True)
class Welcome(Message):
    """Server's answer: its version, whether it requires a secret, its nonce, and (with a
    secret) its proof of knowing it."""

    TYPE: ClassVar[MsgType] = MsgType.WELCOME
    protocol: int
    auth: bool
    nonce: bytes
    proof: str | None

    def body(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "auth": self.auth,
            "nonce": self.nonce.hex(),
            "proof": self.proof,
        }

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Welcome:
        return cls(
            _field(body, "protocol", int),
            _field(body, "auth", bool),
            _nonce(body, "nonce"),
            _proof(body.get("proof")),
        )


@dataclass(frozen=True)
class Auth(Message):
    """Client's proof of knowing the secret (only to a server that requires one)."""

    TYPE: ClassVar[MsgType] = MsgType.AUTH
    proof: str

    def body(self) -> dict[str, Any]:
        return {"proof": self.proof}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Auth:
        value = _proof(body.get("proof"))
        if value is None:
            raise ProtocolError("field 'proof' missing")
        return cls(value)


class Part(Enum):
    """What a server offers, each with its own manifest and chunks: the weights, the
    model directory's other files (config, tokenizer: what a node needs beside them), and
    an engine's compile cache (code the client will run: see SHARE_COMPILE_CACHE)."""

    WEIGHTS = "weights"
    FILES = "files"
    COMPILE_CACHE = "compile-cache"


@dataclass(frozen=True)
class GetManifest(Message):
    """Client: the manifest of `part`; FETCHes that follow name its chunks."""

    TYPE: ClassVar[MsgType] = MsgType.GET_MANIFEST
    part: Part = Part.WEIGHTS

    def body(self) -> dict[str, Any]:
        return {"part": self.part.value}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> GetManifest:
        try:
            return cls(Part(body.get("part", Part.WEIGHTS.value)))
        except ValueError:
            raise ProtocolError(
                f"GET_MANIFEST names an unknown part {body.get('part')!r}"
            ) from None


@dataclass(frozen=True)
class ManifestMessage(Message):
    """The server's manifest (see manifest.py for its JSON form and validation)."""

    TYPE: ClassVar[MsgType] = MsgType.MANIFEST
    manifest: Manifest

    def body(self) -> dict[str, Any]:
        return self.manifest.to_json()

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ManifestMessage:
        return cls(Manifest.from_json(body))


@dataclass(frozen=True)
class Fetch(Message):
    """Client: send these (tensor, chunk) pairs over `transport`."""

    TYPE: ClassVar[MsgType] = MsgType.FETCH
    transport: str
    chunks: tuple[tuple[int, int], ...]

    def body(self) -> dict[str, Any]:
        return {"transport": self.transport, "chunks": [list(c) for c in self.chunks]}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Fetch:
        transport = _field(body, "transport", str)
        chunks = []
        for item in _field(body, "chunks", list):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            ):
                raise ProtocolError("FETCH chunks must be [tensor, chunk] integer pairs")
            chunks.append((item[0], item[1]))
        return cls(transport, tuple(chunks))

    def validate(self, manifest: Manifest) -> Fetch:
        """Every chunk must exist in `manifest`, none twice; returns self."""
        seen: set[tuple[int, int]] = set()
        for t, c in self.chunks:
            if not (0 <= t < len(manifest.tensors) and 0 <= c < manifest.chunk_count(t)):
                raise ProtocolError(f"FETCH names chunk {t}/{c}, which the manifest does not have")
            if (t, c) in seen:
                raise ProtocolError(f"FETCH names chunk {t}/{c} twice")
            seen.add((t, c))
        return self


@dataclass(frozen=True)
class Data:
    """A chunk's bytes (in memory; the socket path reads them straight into tensors)."""

    TYPE: ClassVar[MsgType] = MsgType.DATA
    tensor: int
    chunk: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_data_header(self.tensor, self.chunk, len(self.payload)) + self.payload


@dataclass(frozen=True)
class End(Message):
    """Server: every chunk of the FETCH was sent as DATA."""

    TYPE: ClassVar[MsgType] = MsgType.END


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
        port = _field(body, "port", int)
        if not 0 < port < 65536:
            raise ProtocolError(f"process-group setup names port {port}")
        return cls(port, _field(body, "backend", str))


@dataclass(frozen=True)
class Done(Message):
    """Client: every chunk received over the process group is verified."""

    TYPE: ClassVar[MsgType] = MsgType.DONE


SOCKET_NAME = re.compile(r"netloader-[0-9a-f]{16,64}")
MAX_ADDRESS = (1 << 64) - 1


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
        boot_id, peer = _field(body, "boot_id", str), _field(body, "peer", str)
        name = _field(body, "socket", str)
        if len(boot_id) > 64 or len(peer) > 300 or not SOCKET_NAME.fullmatch(name):
            raise ProtocolError("malformed same-host offer")
        return cls(boot_id, peer, name, _nonce(body, "token"), _address(body, "probe"))


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
        return cls(_field(body, "reason", str)[:MAX_ERROR_TEXT])


@dataclass(frozen=True)
class ChunkAddress(Message):
    """Server: chunk `tensor`/`chunk` is at `address` in its memory (until DONE), for the
    client to read (same-host, nixl)."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK_ADDRESS
    tensor: int
    chunk: int
    address: int

    def body(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "chunk": self.chunk, "address": self.address}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ChunkAddress:
        tensor, chunk = _field(body, "tensor", int), _field(body, "chunk", int)
        return cls(tensor, chunk, _address(body, "address"))


MAX_NIXL_METADATA = 48 << 10


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
        agent, text = _field(body, "agent", str), _field(body, "metadata", str)
        if not SOCKET_NAME.fullmatch(agent) or len(text) > MAX_NIXL_METADATA * 4 // 3 + 4:
            raise ProtocolError("malformed nixl setup")
        try:
            metadata = base64.b64decode(text, validate=True)
        except ValueError:
            raise ProtocolError("nixl metadata is not base64") from None
        return cls(agent, metadata)


def _address(body: dict[str, Any], name: str) -> int:
    value = _field(body, name, int)
    if not 0 <= value <= MAX_ADDRESS:
        raise ProtocolError(f"field {name!r} is not a 64-bit address")
    return int(value)


@dataclass(frozen=True)
class Error(Message):
    """Either side, instead of what was expected; the connection closes after it."""

    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: ErrorCode
    message: str

    def body(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message[:MAX_ERROR_TEXT]}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Error:
        code, message = body.get("code"), body.get("message")
        try:
            parsed = ErrorCode(code)
        except ValueError:
            parsed = ErrorCode.UNKNOWN
        text = message[:MAX_ERROR_TEXT] if isinstance(message, str) else "(no message)"
        return cls(parsed, text)

    def exception(self, peer: str) -> TransferError:
        """What the receiving side raises."""
        return self.code.exception(f"{peer} refused: {self.message}", source=peer)


@dataclass(frozen=True)
class Bye(Message):
    """Client: done with this connection."""

    TYPE: ClassVar[MsgType] = MsgType.BYE


MESSAGES: dict[MsgType, type[Message]] = {
    m.TYPE: m
    for m in (
        Hello,
        Welcome,
        Auth,
        GetManifest,
        ManifestMessage,
        Fetch,
        End,
        ProcessGroupSetup,
        Done,
        SameHostOffer,
        SameHostAccept,
        SameHostDecline,
        ChunkAddress,
        NixlSetup,
        Error,
        Bye,
    )
}


def decode_message(kind: MsgType, body: bytes, max_containers: int | None) -> Message:
    """The typed control message of a frame of type `kind` (not DATA) with `body`, holding
    at most `max_containers` arrays/objects (None: the caller has bounded it already)."""
    if kind is MsgType.DATA:
        raise ProtocolError("DATA is not a control message")
    return MESSAGES[kind].decode(decode_body(body, max_containers))
