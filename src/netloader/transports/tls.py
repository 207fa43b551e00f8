"""Optional TLS for netloader connections (standard library `ssl`).

The server presents a certificate; the client verifies it against a CA file and the
address it dialled (the certificate must name that IP or host). Authentication of the
client stays with the shared secret (HMAC), which TLS then also hides from observers.
TLS covers the tcp transport only: gloo/nccl would carry the weights outside it.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from netloader.errors import AuthenticationError, ConfigError, ProtocolError, SourceUnavailable


def server_context(cert: str | Path, key: str | Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("TLS_CERT", f"cannot load {cert} / {key}: {exc}") from exc
    return context


def client_context(ca: str | Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies certificate and host name
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("TLS_CA", f"cannot load {ca}: {exc}") from exc
    return context


def start_tls(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    peer: str,
    timeout: float,
    server_hostname: str | None = None,
) -> ssl.SSLSocket:
    """Run the TLS handshake on a connected socket, within `timeout` seconds. A client
    passes the `server_hostname` it dialled (the certificate must name it); a server
    passes none. Errors name `peer` and close the socket: a certificate the client cannot
    trust is an AuthenticationError; a client without TLS a ProtocolError at the server,
    a server without TLS a SourceUnavailable at the client."""
    server_side = server_hostname is None
    sock.settimeout(timeout)
    try:
        return context.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname)
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise AuthenticationError(
            f"TLS: {peer} presented a certificate we cannot trust: {exc.verify_message}",
            source=peer,
        ) from exc
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        if server_side:
            raise ProtocolError(f"TLS handshake failed (a client without TLS?): {exc}") from exc
        raise SourceUnavailable(
            f"TLS handshake with {peer} failed (does it use TLS?): {exc}", source=peer
        ) from exc
