"""A self-signed TLS certificate for trials, tests and benchmarks (the `openssl` command)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def self_signed_certificate(directory: Path, hosts: list[str]) -> tuple[Path, Path]:
    """A self-signed certificate for `hosts` (IPs or names) and its key, with the
    `openssl` command: for trials and tests. The certificate is its own CA file."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "netloader.crt", directory / "netloader.key"
    names = ",".join(
        f"IP:{h}" if h.replace(".", "").isdigit() or ":" in h else f"DNS:{h}" for h in hosts
    )
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "30", "-subj", "/CN=netloader", "-addext",
            f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
