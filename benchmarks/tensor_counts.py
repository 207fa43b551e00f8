"""bench_core.py section (d): the same bytes held as 16, ~1,000, ~8,000 and ~64,000 tensors.

Per tensor count, in one run: a real `netloader serve` of a checkpoint of that many equal
tensors (a mixture-of-experts layout), pulled verified into existing (touched) tensors over
tcp and same-host, rounds interleaved; then safetensors `load_file` + `copy_` into the same
kind of tensors from a warm and a cold page cache. Once per run: the verified-copy limit,
every core copying 16 MiB chunks (one memmove each) and hashing them with xxh3, which is
what a same-host pull does at best.
"""

from __future__ import annotations

import ctypes
import gc
import os
import shutil
import statistics
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file

from common import drop_page_cache, interleaved, progress, serve_checkpoint, timed
from netloader import Client
from netloader.tensors import byte_view
from netloader.testing.models import random_bytes, same_bytes, write_checkpoint

COUNTS = (16, 1000, 8000, 64000)
LIMIT_CHUNK = 16 << 20
COLUMNS = 64  # bfloat16 columns of every tensor (rows make up the size)


@dataclass
class CountRow:
    count: int
    tensor_bytes: int
    seconds: dict[str, float | None] = field(default_factory=dict)  # path -> median
    samples: dict[str, list[float]] = field(default_factory=dict)


def moe_tensors(total: int, count: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`count` bfloat16 tensors of equal size, about `total` bytes in all, named like the
    experts of a mixture-of-experts model."""
    rows = max(1, total // count // (2 * COLUMNS))
    data = random_bytes(count * rows * COLUMNS * 2, seed).view(torch.bfloat16)
    parts = data.split(rows * COLUMNS)
    return {
        f"model.layers.{i // 128}.mlp.experts.{i % 128}.weight": part.reshape(rows, COLUMNS)
        for i, part in enumerate(parts)
    }


def touched_like(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A model's parameters: separately allocated, already written once."""
    return {name: torch.zeros_like(t) for name, t in tensors.items()}


def verified_copy_limit(nbytes: int, repeat: int) -> list[float]:
    """Seconds to copy `nbytes` in LIMIT_CHUNK chunks into touched memory and hash each
    copy with xxh3-128, on every core at once (memmove and xxh3 release the GIL)."""
    source = random_bytes(nbytes, 1)
    dest = torch.zeros(nbytes, dtype=torch.uint8)
    view = byte_view(dest)
    starts = range(0, nbytes, LIMIT_CHUNK)

    def one(start: int) -> str:
        length = min(LIMIT_CHUNK, nbytes - start)
        ctypes.memmove(dest.data_ptr() + start, source.data_ptr() + start, length)
        return xxhash.xxh3_128_hexdigest(view[start : start + length])

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        samples = [timed(lambda: list(pool.map(one, starts))) for _ in range(repeat)]
    if not torch.equal(source, dest):
        raise RuntimeError("the verified copy produced other bytes")
    return samples


def measure_count(
    workdir: Path, total: int, count: int, transports: Sequence[str], repeat: int
) -> CountRow:
    tensors = moe_tensors(total, count)
    row = CountRow(len(tensors), sum(t.numel() * t.element_size() for t in tensors.values()))
    directory = workdir / f"moe-{count}"
    ckpt = write_checkpoint(directory, tensors)
    server = serve_checkpoint(directory, workdir / f"server-{count}.log")
    try:
        dest = touched_like(tensors)
        clients = {t: Client([server.address], transport=t) for t in transports}
        identity = next(iter(clients.values())).manifest().identity  # digests ready
        for transport, client in clients.items():  # once, checked, outside the timing
            client.load_into(dest, identity)
            if not all(same_bytes(dest[n], t) for n, t in tensors.items()):
                raise RuntimeError(f"{transport}: the pull delivered other bytes")
        rounds = {t: (lambda c=c: c.load_into(dest, identity)) for t, c in clients.items()}
        for transport, samples in interleaved(rounds, repeat).items():
            row.samples[f"netloader {transport}"] = samples
    finally:
        server.stop()
    del tensors
    gc.collect()

    dest = touched_like({n: t for n, t in load_file(ckpt).items()})

    def load_and_copy() -> None:
        for name, tensor in load_file(ckpt).items():
            dest[name].copy_(tensor)

    load_and_copy()  # warms the page cache
    row.samples["safetensors, warm page cache"] = [timed(load_and_copy) for _ in range(repeat)]
    cold = []
    for _ in range(repeat):
        gc.collect()
        if (why := drop_page_cache()) is not None:
            progress(f"cold page cache rows {why}")
            break
        cold.append(timed(load_and_copy))
    if cold:
        row.samples["safetensors, cold page cache"] = cold
    row.seconds = {path: statistics.median(s) for path, s in row.samples.items()}
    shutil.rmtree(directory, ignore_errors=True)
    return row


def run_counts(
    workdir: Path, total: int, transports: Sequence[str], repeat: int, counts: Sequence[int]
) -> tuple[list[str], dict[str, object]]:
    """The section's table and verdict lines, and its JSON."""
    progress("(d) verified-copy limit ...")
    limit_samples = verified_copy_limit(total, repeat)
    limit = statistics.median(limit_samples)
    rows = []
    for count in counts:
        progress(f"(d) {count} tensors ...")
        rows.append(measure_count(workdir, total, count, transports, repeat))
        gc.collect()
    lines = list(_table(rows, limit, total))
    lines += list(_verdicts(rows, limit, transports))
    report = {
        "bytes": total,
        "verified_copy_limit_seconds": limit,
        "verified_copy_limit_samples": limit_samples,
        "rows": [
            {
                "tensors": r.count,
                "tensor_bytes": r.tensor_bytes,
                "seconds": r.seconds,
                "samples": r.samples,
            }
            for r in rows
        ],
        "verdicts": lines[-len(counts) - 1 :],
    }
    return lines, report


def _table(rows: Sequence[CountRow], limit: float, total: int) -> Iterator[str]:
    paths = list(rows[0].seconds)
    yield "(d) the same bytes as more and more tensors: median seconds (GB/s)"
    yield "    verified-copy limit (copy + xxh3 of 16 MiB chunks, all cores): " + (
        f"{limit:.3f} s ({total / limit / 1e9:.2f} GB/s)"
    )
    header = f"{'tensors':>8} {'bytes each':>11}  " + "  ".join(f"{p:>30}" for p in paths)
    yield header
    for row in rows:
        cells = []
        for path in paths:
            s = row.seconds.get(path)
            cells.append(f"{'-':>30}" if s is None else f"{s:>20.3f} s ({total / s / 1e9:4.2f})")
        yield f"{row.count:>8} {row.tensor_bytes // row.count:>11}  " + "  ".join(cells)


def _verdicts(rows: Sequence[CountRow], limit: float, transports: Sequence[str]) -> Iterator[str]:
    base = rows[0]
    for row in rows:
        parts = []
        for t in transports:
            s, s0 = row.seconds.get(f"netloader {t}"), base.seconds.get(f"netloader {t}")
            if s is not None and s0 is not None:
                parts.append(f"{t} {s / s0:.2f}x the {base.count}-tensor time")
        local, tcp = row.seconds.get("netloader same-host"), row.seconds.get("netloader tcp")
        if local is not None:
            parts.append(f"same-host at {100 * limit / local:.0f}% of the verified-copy limit")
        if local is not None and tcp is not None:
            parts.append(f"same-host {'faster' if local < tcp else 'SLOWER'} than tcp")
        yield f"{row.count} tensors: " + "; ".join(parts)
    yield (
        "targets: within 1.2x of the 16-tensor time on both paths, same-host >= 90% of the "
        "limit and faster than tcp, at every count"
    )
