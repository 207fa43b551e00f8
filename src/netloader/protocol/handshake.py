"""The messages about the connection itself rather than the model: opening it (HELLO,
WELCOME, AUTH: versions and mutual proof of the secret), refusing (ERROR, with a code the
other side turns into an exception), and closing (BYE). Which may come when, and how the
proofs are made, is `session.py`'s business."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
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
from netloader.protocol.body import (
    MAX_ERROR_TEXT,
    Message,
    nonce_field,
    proof_field,
    typed_field,
)
from netloader.protocol.frames import MsgType


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
        return cls(typed_field(body, "protocol", int), nonce_field(body, "nonce"))


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
            typed_field(body, "protocol", int),
            typed_field(body, "auth", bool),
            nonce_field(body, "nonce"),
            proof_field(body.get("proof")),
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
        value = proof_field(body.get("proof"))
        if value is None:
            raise ProtocolError("field 'proof' missing")
        return cls(value)


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
