"""`host:port` addresses as users type them (IPv6 in brackets: `[::1]:8000`), the address a
listener advertises, and the files that publish it."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
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


WILDCARDS = ("0.0.0.0", "::")


def advertised_host(listen_host: str, advertise_host: str | None = None) -> str:
    """The host to tell peers for a listener bound to `listen_host`: `advertise_host` when
    given; a wildcard bind is not reachable, so then this host's own address."""
    if advertise_host:
        return advertise_host
    if listen_host not in WILDCARDS:
        return listen_host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def write_address_file(path: Path, address: Endpoint) -> None:
    """Write "host:port" to `path` atomically (a reader never sees half an address): the
    seed system's OUTPUT_PREFIX file, and a wave's records."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(f"{address}\n")
    os.replace(tmp, path)
