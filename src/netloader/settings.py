"""The knobs every layer shares, one object per kind of setting (as httpx's `Timeout` and
`Limits`): `Client`, `Server`, the configuration, the API and the CLI all take these, so a
default lives in exactly one place."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from netloader.errors import UsageError


@dataclass(frozen=True)
class Timeouts:
    """Seconds before a silent peer is given up on.

    connect:   a client's TCP connect, then again its handshake with the server.
    stall:     silence in the middle of an exchange (either side), once connected.
    handshake: a server's patience with a new connection that has not finished its
               handshake (a client that connects and says nothing), in all.
    min_rate:  bytes per second below which a transfer counts as stalled even if bytes
               trickle in: each chunk must move within stall + its size / min_rate.
    drain:     a server told to stop (SIGTERM): how long the transfers in progress may
               take to finish (it withdraws from any registry at once).
    """

    connect: float = 5.0
    stall: float = 10.0
    handshake: float = 10.0
    min_rate: float = 1e6
    drain: float = 30.0

    def __post_init__(self) -> None:
        for name in ("connect", "stall", "handshake", "min_rate"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UsageError(f"timeout {name!r} must be a positive number, not {value!r}")
            if name != "min_rate" and value > 86400:
                raise UsageError(f"timeout {name!r} must be at most 86400 seconds, not {value}")

    def for_chunk(self, nbytes: int) -> float:
        """The most one chunk of `nbytes` may take, however steadily it trickles."""
        return self.stall + nbytes / self.min_rate


@dataclass(frozen=True)
class Limits:
    """What a server grants at once. Each connection is a thread, so the caps keep a flood
    of connections (or one greedy peer) from growing the server without bound; each
    transfer streams at link speed, so more transfers at once would only share it.

    send_rate:   bytes per second all of the server's transfers together may send (None:
                 as fast as they go); keeps sending from taking the host's CPU and network
                 from its own work. At least MIN_SEND_RATE, so that clients' stall timeouts
                 (`Timeouts.min_rate`) hold.
    sender_nice: the scheduling niceness of the server's threads (0-19; 0: the host
                 process's own): under contention they yield the CPU to inference.
    """

    max_connections: int = 128
    max_connections_per_peer: int = 16
    max_transfers: int = 32
    send_rate: float | None = None
    sender_nice: int = 10

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_connections_per_peer", "max_transfers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"limit {name!r} must be a positive integer, not {value!r}")
        rate = self.send_rate
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not rate >= MIN_SEND_RATE
        ):
            raise UsageError(
                f"send_rate must be at least {MIN_SEND_RATE:.0f} bytes per second, not {rate!r}"
            )
        nice = self.sender_nice
        if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
            raise UsageError(f"sender_nice must be an integer from 0 to 19, not {nice!r}")


MIN_SEND_RATE = 10e6
DEFAULT_TIMEOUTS = Timeouts()
DEFAULT_LIMITS = Limits()

SECRET_ENV = "NETLOADER_SECRET"
MAX_SECRET_BYTES = 4096
# A server's proof of the secret goes to anyone who connects, so a guessable secret can be
# attacked offline; these floors rule out words and short passwords, not bad randomness.
MIN_SECRET_BYTES = 16
MIN_SECRET_SYMBOLS = 8


def resolve_secret(
    secret: bytes | str | None = None, secret_file: str | Path | None = None
) -> bytes | None:
    """The shared secret: `secret` itself, else the contents of `secret_file` (surrounding
    whitespace stripped), else $NETLOADER_SECRET, else None (no authentication).
    UsageError for an empty secret, an unreadable or oversized file."""
    if secret is not None:
        value = secret.encode() if isinstance(secret, str) else secret
    elif secret_file is not None:
        try:
            with open(secret_file, "rb") as f:
                value = f.read(MAX_SECRET_BYTES + 1).strip()
        except OSError as exc:
            raise UsageError(f"cannot read the secret file {secret_file}: {exc.strerror}") from None
        if len(value) > MAX_SECRET_BYTES:
            raise UsageError(f"secret file {secret_file} is over {MAX_SECRET_BYTES} bytes")
    elif os.environ.get(SECRET_ENV):
        value = os.environ[SECRET_ENV].encode()
    else:
        return None
    if not value:
        raise UsageError("the netloader secret is empty")
    if len(value) < MIN_SECRET_BYTES or len(set(value)) < MIN_SECRET_SYMBOLS:
        raise UsageError(
            f"the netloader secret is too weak: it needs at least {MIN_SECRET_BYTES} bytes "
            f"and {MIN_SECRET_SYMBOLS} different characters (`netloader secret` makes one)"
        )
    return value


def new_secret() -> str:
    """A random secret: 32 bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)
