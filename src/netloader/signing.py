"""HTTP requests signed with the netloader secret (for `POST /netloader/update`): an
HMAC-SHA256 over the time, the method, the host it is sent to (its Host header, so that a
request for one instance cannot be replayed to another of the fleet), the path and the
body, in two headers. The receiver refuses a request signed more than `MAX_SKEW` seconds
away from its clock, or one it has seen already (a replay). Standard library only:
`netloader update` signs without importing torch."""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections.abc import Mapping

TIME_HEADER = "X-Netloader-Time"
SIGNATURE_HEADER = "X-Netloader-Signature"
MAX_SKEW = 60.0  # seconds between the signer's clock and the receiver's


def _mac(secret: bytes, when: str, method: str, host: str, path: str, body: bytes) -> bytes:
    fields = ["netloader-request-v1", when, method, host.lower(), path]
    signed = "\n".join(fields).encode("utf-8", "surrogateescape") + b"\n" + body
    return hmac.new(secret, signed, hashlib.sha256).hexdigest().encode()


def sign(
    secret: bytes, method: str, host: str, path: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The headers that sign a request.

    secret: the netloader secret (`settings.resolve_secret`).
    method: the HTTP method, e.g. "POST".
    host:   the Host header the request carries: the URL's "host:port" as written.
    path:   the URL's path, e.g. "/netloader/update" (no query string).
    body:   the exact bytes sent as the body.
    now:    the signing time in Unix seconds (default: the clock's).
    """
    when = f"{time.time() if now is None else now:.3f}"
    mac = _mac(secret, when, method, host, path, body)
    return {TIME_HEADER: when, SIGNATURE_HEADER: mac.decode()}


class SignedRequests:
    """The receiving side: checks signatures and remembers the recent ones (replays are
    refused). Thread-safe."""

    def __init__(self, secret: bytes | None, max_skew: float = MAX_SKEW) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self._seen: dict[str, float] = {}  # signature -> its time, while within the skew
        self._lock = threading.Lock()

    def refusal(
        self,
        method: str,
        host: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str],
        now: float | None = None,
    ) -> str | None:
        """None if the request is signed with the secret, recent and new; else why not.

        host:    the Host header it came with.
        headers: the request's headers (names as sent; looked up case-insensitively
                 where `headers` is, as Starlette's are, else as TIME_HEADER and
                 SIGNATURE_HEADER spell them).
        """
        if self.secret is None:
            return (
                "this instance has no netloader secret (NETLOADER_SECRET or SECRET_FILE), "
                "and its update route serves only signed requests"
            )
        when, signature = headers.get(TIME_HEADER), headers.get(SIGNATURE_HEADER)
        if not when or not signature:
            return (
                f"the request is not signed ({TIME_HEADER}, {SIGNATURE_HEADER}): use --secret-file"
            )
        try:
            signed_at = float(when)
        except ValueError:
            return f"{TIME_HEADER} is not a time: {when[:40]!r}"
        now = time.time() if now is None else now
        if not abs(now - signed_at) <= self.max_skew:
            return f"the request was signed {now - signed_at:.0f} s away from this clock"
        expected = _mac(self.secret, when, method, host, path, body)
        if not hmac.compare_digest(expected, signature.encode("utf-8", "replace")):
            return "the signature does not match: another secret, or signed for another host"
        with self._lock:
            for old in [s for s, t in self._seen.items() if abs(now - t) > self.max_skew]:
                del self._seen[old]
            if signature in self._seen:
                return "this very request was received before (a replay)"
            self._seen[signature] = signed_at
        return None
