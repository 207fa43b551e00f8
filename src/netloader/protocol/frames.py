"""Framing, free of I/O: the fixed header every frame starts with, each type's body bound,
and the DATA prefix. Kept apart from the typed messages because the socket layer reads
headers and DATA bodies itself, before (or instead of) parsing any message.

A header is 16 bytes: magic b"NLDR", a type byte, 3 zero bytes, and the body length (u64,
big-endian). A DATA body is an 8-byte prefix (the chunk's index, u64) followed
by the chunk's raw bytes (its pieces, in order), which the I/O layer reads straight into
tensor memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from netloader.errors import ProtocolError

# 2: control frames after an authenticated handshake carry a tag; 3: GET_MANIFEST names a
# part; 4: the same-host transport's messages; 5: chunks span tensors (manifest format 2),
# named by their index
PROTOCOL_VERSION = 5
MAGIC = b"NLDR"
HEADER = struct.Struct("!4sB3xQ")
DATA_PREFIX = struct.Struct("!Q")
MAX_DATA_BYTES = 1 << 32
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
    CUDA_IPC_OFFER = 18
    CUDA_IPC_TENSOR = 19


# Largest body each type may claim: a peer cannot make us allocate more than this.
SMALL_BODY = 64 << 10
MAX_BODY: dict[MsgType, int] = {t: SMALL_BODY for t in MsgType}
MAX_BODY[MsgType.MANIFEST] = 256 << 20
MAX_BODY[MsgType.FETCH] = 64 << 20
MAX_BODY[MsgType.NIXL_SETUP] = 8 << 20
MAX_BODY[MsgType.DATA] = DATA_PREFIX.size + MAX_DATA_BYTES


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


def encode_data_header(chunk: int, length: int) -> bytes:
    """Header and prefix of a DATA frame; the chunk's `length` raw bytes follow."""
    return HEADER.pack(MAGIC, MsgType.DATA, DATA_PREFIX.size + length) + DATA_PREFIX.pack(chunk)


def decode_data_prefix(data: bytes) -> int:
    """The chunk index a DATA frame carries."""
    (chunk,) = DATA_PREFIX.unpack(data)
    return int(chunk)


def encode(kind: MsgType, body: dict[str, Any]) -> bytes:
    """A control frame from its type and JSON body (the typed classes use this)."""
    return encode_json(kind, json_bytes(body))


def json_bytes(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def encode_json(kind: MsgType, payload: bytes) -> bytes:
    """A control frame from its type and its body already in JSON."""
    return HEADER.pack(MAGIC, kind, len(payload)) + payload
