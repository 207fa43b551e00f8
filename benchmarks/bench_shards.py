"""Shard-aware pulls from a checkpoint source: what one tensor-parallel rank moves.

A llama-shaped checkpoint (bfloat16) is served twice by real `netloader serve` processes:
with rows only (`--column-tiles 1`, the default) and with 8 column tiles, in chunks of
`--chunk-kib` (1 MiB by default, so that this small model's matrices span several chunks
as a 70B model's span several 16 MiB chunks). Per server and
transport, in one run, rounds interleaved: the whole checkpoint streamed (what a rank
pulled before shard-aware pulls, and what a tp=1 client pulls), and the part rank 0 of a
tp=2 and of a tp=8 instance keeps, as vLLM shards a llama: q/k/v, gate/up, embeddings
and LM head by rows; o_proj and down_proj by columns; norms whole. Beside them, the way
a rank loads from disk today: safetensors `load_file` of the whole file from a warm page
cache, copied into existing tensors (every rank reads every tensor, then keeps its
shard); and the verified-copy limit of the whole checkpoint (copy + xxh3 of 16 MiB
chunks on every core, bench_core's limit).

    python benchmarks/bench_shards.py --size-mib 1024 --repeat 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from common import interleaved, progress, serve_checkpoint
from netloader import Client
from netloader.client import stream_tensors
from netloader.manifest import Manifest
from netloader.testing.models import llama_like, write_checkpoint
from tensor_counts import verified_copy_limit

BY_COLUMNS = ("o_proj", "down_proj")
BY_ROWS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "embed_tokens", "lm_head")
Box = tuple[tuple[int, int], ...]


def rank_parts(manifest: Manifest, tp: int, rank: int) -> dict[str, list[Box]]:
    """The part of each weight rank `rank` of a tp-way llama keeps (as vLLM shards it)."""
    parts: dict[str, list[Box]] = {}
    for t in manifest.tensors:
        if len(t.shape) != 2:
            continue
        rows, cols = t.shape
        if any(k in t.name for k in BY_ROWS):
            parts[t.name] = [((rank * rows // tp, (rank + 1) * rows // tp),)]
        elif any(k in t.name for k in BY_COLUMNS):
            parts[t.name] = [((0, rows), (rank * cols // tp, (rank + 1) * cols // tp))]
    return parts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="nl-shards-") as tmp:
        directory = Path(tmp) / "llama"
        progress(f"writing a {args.size_mib} MiB llama-shaped checkpoint")
        path = write_checkpoint(directory, llama_like(args.size_mib << 20))
        total = path.stat().st_size
        servers = {
            tiles: serve_checkpoint(directory, Path(tmp) / f"serve{tiles}.log", extra)
            for tiles, extra in (
                (1, ("--chunk-kib", str(args.chunk_kib))),
                (8, ("--chunk-kib", str(args.chunk_kib), "--column-tiles", "8")),
            )
        }
        try:
            rounds, moved = {}, {}
            for tiles, server in servers.items():
                manifest = Client([server.address]).manifest()
                for transport in ("tcp", "same-host"):
                    client = Client([server.address], transport=transport)
                    for what, parts in (
                        ("whole", None),
                        ("tp=2 rank", rank_parts(manifest, 2, 0)),
                        ("tp=8 rank", rank_parts(manifest, 8, 0)),
                    ):
                        name = f"tiles={tiles} {transport:9} {what}"
                        received: list[int] = []

                        def pull(
                            client: Client = client,
                            manifest: Manifest = manifest,
                            parts: dict[str, list[Box]] | None = parts,
                            received: list[int] = received,
                        ) -> None:
                            received.clear()
                            for _ in stream_tensors(
                                client, manifest, parts=parts, progress=received.append
                            ):
                                pass

                        rounds[name] = pull
                        moved[name] = received
            dest = {n: t.clone() for n, t in load_file(path).items()}  # touched, warm cache

            def from_disk() -> None:
                for name, tensor in load_file(path).items():
                    dest[name].copy_(tensor)

            rounds["safetensors load_file + copy_, warm"] = from_disk
            progress(f"{len(rounds)} variants x {args.repeat} rounds")
            samples = interleaved(rounds, args.repeat)
            samples["limit: verified copy of it all"] = verified_copy_limit(total, args.repeat)
        finally:
            for server in servers.values():
                server.stop()
    print(f"\n{total / 2**20:.0f} MiB checkpoint; medians of {args.repeat}, one run\n")
    print(f"| {'variant':40} | bytes moved | share | seconds |")
    print(f"| {'-' * 40} | ----------- | ----- | ------- |")
    for name, times in samples.items():
        count = sum(moved[name]) if name in moved else total
        median = statistics.median(times)
        print(f"| {name:40} | {count:11d} | {count / total:5.0%} | {median:7.3f} |")


if __name__ == "__main__":
    main()
