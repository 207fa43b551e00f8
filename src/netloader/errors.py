"""The project's exception types: every failure a caller can meet is one of these."""

from __future__ import annotations

from collections.abc import Iterable


class NetloaderError(Exception):
    """Base class of every error netloader raises on purpose."""


class ConfigError(NetloaderError, ValueError):
    """A configuration field is unknown, of the wrong type, or out of range."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"netloader config field {field!r}: {problem}")
        self.field = field
        self.problem = problem


class UsageError(NetloaderError, ValueError):
    """The caller asked for something that cannot work (a bad argument, an empty secret,
    a wave directory that is full): fix the call, retrying will not help."""


class ProtocolError(NetloaderError):
    """A peer sent bytes that are not a valid netloader message."""


class TransferError(NetloaderError):
    """A pull did not complete. `completed` names the tensors that did arrive, verified,
    so a fallback loader needs to load only the rest."""

    def __init__(
        self, message: str, *, source: str | None = None, completed: Iterable[str] = ()
    ) -> None:
        super().__init__(message)
        self.source = source
        self.completed: frozenset[str] = frozenset(completed)


class SourceUnavailable(TransferError):
    """No connection could be made to a source, or it refused us before any bytes moved."""


class ServerBusy(SourceUnavailable):
    """The server is at a connection cap; it may have room again in a moment."""


class VersionMismatch(TransferError):
    """The peer speaks another protocol version."""


class AuthenticationError(TransferError):
    """The peer could not prove it knows the shared secret, or rejected ours."""


class ManifestMismatch(TransferError):
    """The server's model, layout or tensor manifest differs from what the client expects.
    Raised before any tensor bytes move."""

    @classmethod
    def from_differences(
        cls, differences: list[str], *, source: str | None = None
    ) -> ManifestMismatch:
        shown = "; ".join(differences[:10])
        more = f" (and {len(differences) - 10} more)" if len(differences) > 10 else ""
        return cls(f"manifest mismatch: {shown}{more}", source=source)


class IntegrityError(TransferError):
    """Bytes arrived whose digest differs from the manifest's: they were not accepted.
    `source` names the peer that sent them."""


class TransferTimeout(TransferError):
    """The peer stopped sending for longer than the stall timeout."""


class PeerClosed(TransferError):
    """The peer closed the connection or died in the middle of the exchange."""


class RemoteError(TransferError):
    """The peer answered with an ERROR frame whose code has no more specific type."""
