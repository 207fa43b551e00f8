"""A big manifest: 100,000 tiny tensors (a mixture-of-experts checkpoint's scales), from
building the manifest to a verified pull, with the sizes the protocol bounds.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_manifest.py --tensors 100000

Reports: the manifest's build time (digests over real tensors), its encoded size beside the
MANIFEST bound, encoding and decoding (with validation) times, a client's connect +
handshake + manifest over loopback against a server in another process, and a verified
pull of the whole model (tcp and same-host). Medians of --repeat runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from common import progress, serve_checkpoint
from netloader import Client
from netloader import protocol as p
from netloader.manifest import Identity, Manifest, build_manifest
from netloader.testing.models import random_bytes, same_bytes, write_checkpoint


def scales(count: int) -> dict[str, torch.Tensor]:
    """`count` float32 tensors of 4 values, named like per-expert scales."""
    data = random_bytes(count * 16, 3).view(torch.float32)
    return {
        f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.weight_scale": part
        for i, part in enumerate(data.split(4))
    }


def median_seconds(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    tensors = scales(args.tensors)
    rows: list[tuple[str, str]] = []
    built: list[Manifest] = []
    seconds = median_seconds(lambda: built.append(build_manifest(Identity("m"), tensors)), 1)
    manifest = built[0]
    rows.append(("build (digests over the tensors)", f"{seconds:.3f} s"))
    frame = p.ManifestMessage(manifest).encode()
    bound = p.MAX_BODY[p.MsgType.MANIFEST]
    rows.append(("chunks", f"{manifest.chunk_total}"))
    rows.append(
        (
            "encoded size",
            f"{len(frame) / 1e6:.2f} MB ({100 * len(frame) / bound:.1f}% of the bound)",
        )
    )
    encode = functools.partial(json.dumps, manifest.to_json(), separators=(",", ":"))
    encoded = median_seconds(encode, args.repeat)  # once per served manifest: it is cached
    rows.append(("encode (once per served manifest)", f"{encoded:.3f} s"))
    body = json.loads(frame[p.HEADER.size :])
    rows.append(
        (
            "decode + validate + plan",
            f"{median_seconds(lambda: Manifest.from_json(body).chunks, args.repeat):.3f} s",
        )
    )
    with tempfile.TemporaryDirectory(prefix="netloader-manifest-") as tmp:
        directory = Path(tmp) / "scales"
        write_checkpoint(directory, tensors)
        progress("serving ...")
        server = serve_checkpoint(directory, Path(tmp) / "server.log")
        try:
            client = Client([server.address])
            client.manifest()  # the server's digests are ready
            rows.append(
                (
                    "connect + handshake + manifest (loopback)",
                    f"{median_seconds(client.manifest, args.repeat):.3f} s",
                )
            )
            identity = client.manifest().identity
            for transport in ("tcp", "same-host"):
                dest = {n: torch.zeros_like(t) for n, t in tensors.items()}
                puller = Client([server.address], transport=transport)
                puller.load_into(dest, identity)
                if not all(same_bytes(dest[n], t) for n, t in tensors.items()):
                    raise RuntimeError(f"{transport}: other bytes arrived")
                pull = functools.partial(puller.load_into, dest, identity)
                pulled = median_seconds(pull, args.repeat)
                rows.append((f"verified pull of all of it, {transport}", f"{pulled:.3f} s"))
        finally:
            server.stop()
    width = max(len(r[0]) for r in rows)
    print(f"{args.tensors} tensors of 16 bytes:")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
