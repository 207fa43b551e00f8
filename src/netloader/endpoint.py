"""`host:port` addresses as users type them (IPv6 in brackets: `[::1]:8000`)."""

from __future__ import annotations

from typing import NamedTuple


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_endpoint(text: object, *, allow_zero: bool = False) -> Endpoint:
    """Parse 'host:port'; raise ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'host:port' as a string, got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"expected 'host:port', got {text!r}")
    port = int(port_text)
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} in {text!r} is outside 1-65535")
    return Endpoint(host, port)
