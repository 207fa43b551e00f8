"""Control bodies, free of I/O: parsing one JSON object from untrusted bytes within a
bound, the `Message` base class, and the field checks every message's decoder uses, so
that anything malformed raises ProtocolError and nothing is unpickled."""

from __future__ import annotations

import json
from typing import Any, ClassVar

from netloader.errors import ProtocolError
from netloader.protocol.frames import MsgType, encode

NONCE_BYTES = 32
MAX_ERROR_TEXT = 2000

# Most JSON arrays and objects a body may hold, by type (a manifest's and a FETCH's depend
# on the model: the sessions tighten them). Counted before parsing, because parsing is
# where a hostile body costs memory: 256 MiB of "{}," is 85 million dicts.
MAX_CONTAINERS: dict[MsgType, int] = {t: 8 for t in MsgType}
MAX_CONTAINERS[MsgType.MANIFEST] = 4 + 2 * 1_000_000  # top, identity, attributes; 2 per tensor


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


def typed_field(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """`body[name]`, which must be a `kind` (a bool is not an int here)."""
    value = body.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {name!r} missing or of the wrong type")
    return value


def nonce_field(body: dict[str, Any], name: str) -> bytes:
    """`body[name]`: NONCE_BYTES bytes, in hex."""
    text = typed_field(body, name, str)
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ProtocolError(f"field {name!r} is not hex") from None
    if len(value) != NONCE_BYTES:
        raise ProtocolError(f"field {name!r} must be {NONCE_BYTES} bytes")
    return value


def proof_field(value: object) -> str | None:
    """An authentication proof: a short ASCII string, or None."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 128 or not value.isascii():
        raise ProtocolError("field 'proof' must be a short ASCII string or null")
    return value
