"""What security costs: the same checkpoint pulled from a `netloader serve` process on
loopback, plain, with the shared-secret handshake, over TLS, and with both; each into
touched tensors (the network-bound case), median of several pulls, all verified.

    .venv/bin/python benchmarks/bench_security.py --size-gib 1 --json runs/bench_security.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import serve_checkpoint
from netloader import Client
from netloader.testing.certs import self_signed_certificate
from netloader.testing.models import checkpoint_specs, empty_like, llama_like, write_checkpoint
from netloader.transports.tls import client_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = write_checkpoint(root / "model", llama_like(int(args.size_gib * (1 << 30))))
        specs = checkpoint_specs(checkpoint)
        total_bytes = sum(s.nbytes for s in specs)
        cert, key = self_signed_certificate(root / "tls", ["127.0.0.1"])
        secret = "bench secret, long enough to pass"
        modes = {
            "plain": ([], None, None),
            "secret (HMAC handshake)": ([], secret, None),
            "TLS": (["--tls-cert", str(cert), "--tls-key", str(key)], None, cert),
            "TLS + secret": (["--tls-cert", str(cert), "--tls-key", str(key)], secret, cert),
        }
        dest = empty_like(specs, fill=0)  # touched tensors: the network-bound case
        rows: list[dict[str, Any]] = []
        for mode, (extra, secret_value, ca) in modes.items():
            env = dict(os.environ)
            env.pop("NETLOADER_SECRET", None)
            if secret_value:
                env["NETLOADER_SECRET"] = secret_value
            server = serve_checkpoint(checkpoint.parent, root / f"{len(rows)}.log", extra, env)
            try:
                client = Client(
                    [server.address],
                    secret=secret_value.encode() if secret_value else None,
                    tls=None if ca is None else client_context(ca),
                )
                identity = client.manifest().identity  # once its digests are ready
                seconds = []
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    client.load_into(dest, identity)
                    seconds.append(time.perf_counter() - started)
            finally:
                server.stop()
            median = statistics.median(seconds)
            rows.append(
                {
                    "mode": mode,
                    "seconds": median,
                    "min": min(seconds),
                    "max": max(seconds),
                    "gbps": total_bytes / median / 1e9,
                }
            )
            print(f"{mode:26} {median:.3f} s  {rows[-1]['gbps']:.2f} GB/s", flush=True)
    plain = rows[0]["seconds"]
    print(f"\n{total_bytes} bytes, median of {args.repeat} pulls into touched tensors")
    print("| mode | seconds | GB/s | vs plain |\n| --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['seconds']:.3f} (min {row['min']:.3f}, max "
            f"{row['max']:.3f}) | {row['gbps']:.2f} | {row['seconds'] / plain:.2f}x |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
