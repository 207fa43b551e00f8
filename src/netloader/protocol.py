"""Wire format, free of I/O (in the spirit of h11): encoders, and decoders that validate
untrusted bytes and raise ProtocolError for anything malformed. Nothing is unpickled.

Every frame starts with a fixed 16-byte header: magic b"NLDR", a type byte, 3 zero bytes,
and the body length (u64, big-endian). Control bodies are JSON objects with a per-type size
bound. A DATA body is an 8-byte prefix (tensor index u32, chunk index u32) followed by the
chunk's raw bytes, which the I/O layer reads straight into tensor memory.

Conversation (client C, server S):
    C HELLO{protocol, nonce}            S WELCOME{protocol, auth, nonce, proof}
    C AUTH{proof}          (only when the server has a secret; mutual HMAC-SHA256)
    C GET_MANIFEST{}                    S MANIFEST{...}
    C FETCH{transport, chunks}          tcp:  S DATA... S END{}
                                        gloo: S GLOO{port}, bytes on a process group, C DONE{}
    C BYE{}                 any side may send ERROR{code, message} and close instead.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from netloader.errors import ProtocolError
from netloader.manifest import Manifest

MAGIC = b"NLDR"
HEADER = struct.Struct("!4sB3xQ")
DATA_PREFIX = struct.Struct("!II")
NONCE_BYTES = 32
MAX_DATA_BYTES = 1 << 32


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


# Largest body each type may claim: a peer cannot make us allocate more than this.
_SMALL = 64 << 10
MAX_BODY: dict[MsgType, int] = {t: _SMALL for t in MsgType}
MAX_BODY[MsgType.MANIFEST] = 256 << 20
MAX_BODY[MsgType.FETCH] = 64 << 20
MAX_BODY[MsgType.DATA] = DATA_PREFIX.size + MAX_DATA_BYTES


@dataclass(frozen=True)
class FrameHeader:
    type: MsgType
    length: int


def encode(kind: MsgType, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    return HEADER.pack(MAGIC, kind, len(payload)) + payload


def encode_data_header(tensor: int, chunk: int, length: int) -> bytes:
    return HEADER.pack(MAGIC, MsgType.DATA, DATA_PREFIX.size + length) + DATA_PREFIX.pack(
        tensor, chunk
    )


def decode_header(data: bytes) -> FrameHeader:
    if len(data) != HEADER.size:
        raise ProtocolError(f"frame header must be {HEADER.size} bytes, got {len(data)}")
    magic, kind, length = HEADER.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"not a netloader peer (frame starts with {magic!r})")
    try:
        msg_type = MsgType(kind)
    except ValueError:
        raise ProtocolError(f"unknown message type {kind}") from None
    if length > MAX_BODY[msg_type]:
        raise ProtocolError(f"{msg_type.name} body of {length} bytes exceeds {MAX_BODY[msg_type]}")
    if msg_type is MsgType.DATA and length < DATA_PREFIX.size:
        raise ProtocolError("DATA frame shorter than its prefix")
    return FrameHeader(msg_type, length)


def decode_body(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ProtocolError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("control message must be a JSON object")
    return body


def decode_data_prefix(data: bytes) -> tuple[int, int]:
    tensor, chunk = DATA_PREFIX.unpack(data)
    return tensor, chunk


# ---- typed messages ---------------------------------------------------------------------


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


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, role: str, first: bytes, second: bytes) -> str:
    """HMAC-SHA256 over both nonces, bound to the prover's role so a proof cannot be
    reflected back at its sender."""
    return hmac.new(secret, role.encode() + first + second, hashlib.sha256).hexdigest()


def proof_matches(secret: bytes, role: str, first: bytes, second: bytes, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(proof(secret, role, first, second), given)


@dataclass(frozen=True)
class Hello:
    protocol: int
    nonce: bytes

    def encode(self) -> bytes:
        return encode(MsgType.HELLO, {"protocol": self.protocol, "nonce": self.nonce.hex()})

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Hello:
        return cls(_field(body, "protocol", int), _nonce(body, "nonce"))


@dataclass(frozen=True)
class Welcome:
    protocol: int
    auth: bool
    nonce: bytes
    proof: str | None

    def encode(self) -> bytes:
        return encode(
            MsgType.WELCOME,
            {
                "protocol": self.protocol,
                "auth": self.auth,
                "nonce": self.nonce.hex(),
                "proof": self.proof,
            },
        )

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Welcome:
        proof_value = body.get("proof")
        if proof_value is not None and not isinstance(proof_value, str):
            raise ProtocolError("field 'proof' must be a string or null")
        return cls(
            _field(body, "protocol", int),
            _field(body, "auth", bool),
            _nonce(body, "nonce"),
            proof_value,
        )


@dataclass(frozen=True)
class Fetch:
    transport: str
    chunks: tuple[tuple[int, int], ...]

    def encode(self) -> bytes:
        return encode(
            MsgType.FETCH, {"transport": self.transport, "chunks": [list(c) for c in self.chunks]}
        )

    @classmethod
    def decode(cls, body: dict[str, Any], manifest: Manifest) -> Fetch:
        """Validate against `manifest`: every chunk must exist, none twice."""
        transport = _field(body, "transport", str)
        raw = _field(body, "chunks", list)
        chunks, seen = [], set()
        for item in raw:
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in item)
            ):
                raise ProtocolError("FETCH chunks must be [tensor, chunk] integer pairs")
            t, c = item
            if not (0 <= t < len(manifest.tensors) and 0 <= c < manifest.chunk_count(t)):
                raise ProtocolError(f"FETCH names chunk {t}/{c}, which the manifest does not have")
            if (t, c) in seen:
                raise ProtocolError(f"FETCH names chunk {t}/{c} twice")
            seen.add((t, c))
            chunks.append((t, c))
        return cls(transport, tuple(chunks))


def error(code: str, message: str) -> bytes:
    return encode(MsgType.ERROR, {"code": code, "message": message[:2000]})


def describe_error(body: dict[str, Any]) -> tuple[str, str]:
    code, message = body.get("code"), body.get("message")
    return (code if isinstance(code, str) else "unknown"), (
        message if isinstance(message, str) else "(no message)"
    )


def manifest_message(manifest: Manifest) -> bytes:
    return encode(MsgType.MANIFEST, manifest.to_json())
