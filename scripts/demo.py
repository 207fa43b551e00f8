"""The main job, end to end: a `netloader serve` process holds a checkpoint in memory; this
process builds empty tensors for the same model and pulls the weights into them, verified,
then checks them bit for bit against the file and compares with loading from disk, with
the file in the page cache (warm) and evicted from it (cold, what a new node meets)."""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file

import netloader
from netloader.testing.models import (
    checkpoint_specs,
    differing,
    empty_like,
    llama_like,
    write_checkpoint,
)
from netloader.testing.processes import ServerProcess, netloader_command

NETLOADER = netloader_command()
TRANSPORTS = ("same-host", "tcp", "gloo")
WARM = "safetensors from disk into fresh memory, warm page cache"
COLD = (
    "safetensors from disk into fresh memory, cold page cache (evicted with posix_fadvise DONTNEED)"
)
CLI = "netloader pull to disk (CLI process, incl. start-up)"
WIDTH = 92  # the explanation under the table


def build_checkpoint(directory: Path, size_mib: int) -> Path:
    """A Llama-shaped checkpoint of about `size_mib` (netloader.testing.models.llama_like),
    made locally (no hub) and kept for the next run."""
    path = directory / "model.safetensors"
    stamp, made = directory / "made", f"llama_like {size_mib} MiB"
    if path.exists() and stamp.exists() and stamp.read_text() == made:
        return path
    write_checkpoint(directory, llama_like(size_mib << 20))
    stamp.write_text(made)
    return path


def empty_model(path: Path) -> dict[str, torch.Tensor]:
    """What a loader has before loading: tensors of the right dtype and shape, no data."""
    return empty_like(checkpoint_specs(path))


# ---- the page cache -------------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache, without root: written back first (dirty
    pages cannot be dropped), then POSIX_FADV_DONTNEED. Pages that a process still maps
    stay; the server copied the weights out of its mapping, and this process holds none."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm_up(path: Path) -> None:
    """Read the whole file once, so that it is in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mmap_, munmap, mincore = libc.mmap, libc.munmap, libc.mincore
    except (OSError, AttributeError):
        return None
    mmap_.restype = ctypes.c_void_p
    mmap_.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


LIBC = _libc()


def resident(path: Path) -> float | None:
    """The fraction of the file's pages in the page cache (mincore on a mapping of it,
    which reads nothing); None where that cannot be asked."""
    size = path.stat().st_size
    if LIBC is None or size == 0:
        return None
    with open(path, "rb") as f:
        address = LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, f.fileno(), 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        return None
    try:
        pages = -(-size // mmap.PAGESIZE)
        vector = ctypes.create_string_buffer(pages)
        if LIBC.mincore(address, size, vector) != 0:
            return None
        return sum(byte & 1 for byte in vector.raw) / pages
    finally:
        LIBC.munmap(address, size)


# ---- measurements ---------------------------------------------------------------------------


def timed(fn: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def from_disk(model: dict[str, torch.Tensor], ckpt: Path) -> None:
    """Today's way: load_file (which only maps the file) and copy every tensor into the
    model's memory, which is where the bytes are read."""
    loaded = load_file(ckpt)
    for name, tensor in model.items():
        tensor.copy_(loaded[name])
    del loaded  # unmapped: a mapped page cannot be evicted


def explain(results: dict[str, list[float]], cached: dict[str, list[float | None]]) -> str:
    """What the table means, with this run's figures."""
    median = {name: statistics.median(samples) for name, samples in results.items()}
    cold, warm = median[COLD], median[WARM]
    fresh = ", ".join(
        f"{t} {median[f'netloader pull over {t}, into fresh memory']:.3f} s" for t in TRANSPORTS
    )
    bullets = [
        "netloader pull: netloader.load() from the server process's memory into the model's "
        "tensors, connection, manifest check and the xxh3 check of every chunk included; "
        "into fresh memory (a just-built model: every page faults on its first write) or "
        "into tensors already loaded (the transfer alone). The server holds the weights in "
        "memory, so no storage is read: these rows are the same whatever storage a node has.",
        "safetensors, warm page cache: load_file + copy_ into a fresh model (no integrity "
        "check) with the whole file in the page cache, read just before. Disk's best case: "
        "what a node meets right after writing or reading the file (a restart in place).",
        "safetensors, cold page cache: the same after the file's pages were evicted (fsync, "
        "then posix_fadvise POSIX_FADV_DONTNEED, no root needed): what a new instance on a "
        "fresh node meets, here from this machine's disk (a VM's disk may itself be cached "
        "by its host). Network storage (NFS, object stores) is not measured here.",
        "netloader pull to disk: the `netloader pull` command writing a model directory, "
        "process start-up and fsync included, for an engine to load afterwards.",
    ]
    notes = []
    evicted = [round(100 * r) for r in cached[COLD] if r is not None]
    warmed = [round(100 * r) for r in cached[WARM] if r is not None]
    if evicted:
        notes.append(
            f"Page cache before each cold read (mincore): {', '.join(map(str, evicted))}% of "
            f"the file's pages; before each warm read: {', '.join(map(str, warmed))}%."
        )
    if any(share > 1 for share in evicted):
        notes.append("WARNING: the eviction left pages cached: the cold row is not fully cold.")
    if cold < 1.2 * warm:
        why = (
            "the pages were evicted (mincore), so this storage reads about as fast as memory."
            if evicted and max(evicted) <= 1
            else "the eviction may not have worked."
        )
        notes.append(
            f"WARNING: the cold read ({cold:.3f} s) is nearly as fast as the warm one "
            f"({warm:.3f} s): {why}"
        )
    notes += [
        f"This run, into fresh memory (what a new instance starts from): netloader {fresh}; "
        f"safetensors {cold:.3f} s cold, {warm:.3f} s warm.",
        "Here the server and the client share one host's CPU cores and tcp runs over "
        "loopback; between hosts the tcp row is bound by the network instead. Netloader wins "
        "where storage delivers the file slower than its fresh-memory rows: compare those "
        "with your storage's cold read.",
    ]
    text = ["What the rows measure (wall time, median of the runs):"]
    text += [textwrap.fill(b, WIDTH, initial_indent="- ", subsequent_indent="  ") for b in bullets]
    text += [textwrap.fill(n, WIDTH) for n in notes]
    return "\n".join(text)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="runs of every row (median)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    started = time.perf_counter()
    ckpt = build_checkpoint(args.workdir / "ckpt", args.size_mib)
    print(
        f"checkpoint: {ckpt} ({ckpt.stat().st_size / 1e9:.2f} GB), "
        f"built in {time.perf_counter() - started:.1f} s"
    )
    load_before = os.getloadavg()[0]

    server = ServerProcess(
        [NETLOADER, "-v", "serve", str(ckpt.parent), "--model", "demo"],
        log=args.workdir / "server.log",
    )
    try:
        print(f"server process {server.pid}: {server.ready.string.strip()}")
        address = server.address

        # The model's name is all a client has to say; asking for the manifest first
        # waits until the server's digests are ready, which is not part of a pull.
        netloader.Client([address]).manifest()
        identity = "demo"
        results: dict[str, list[float]] = {}
        cached: dict[str, list[float | None]] = {WARM: [], COLD: []}
        reference: dict[str, torch.Tensor] = {}
        wrong: list[str] = []

        def sample(name: str, seconds: float) -> None:
            results.setdefault(name, []).append(seconds)

        # Every row once per round, so that a slow spell of a busy machine hits all alike.
        for round_ in range(args.repeat):
            # Today's way, for comparison: read the file and copy into the model's memory,
            # first from the page cache, then with the file evicted from it.
            warm_up(ckpt)
            cached[WARM].append(resident(ckpt))
            model = empty_model(ckpt)
            sample(WARM, timed(from_disk, model, ckpt))
            evict(ckpt)
            cached[COLD].append(resident(ckpt))
            model = empty_model(ckpt)
            sample(COLD, timed(from_disk, model, ckpt))
            reference = reference or model
            del model

            for transport in TRANSPORTS:
                dest = empty_model(ckpt)
                for memory in ("fresh", "loaded"):
                    t0 = time.perf_counter()
                    report = netloader.load(dest, [address], identity, transport=transport)
                    sample(
                        f"netloader pull over {transport}, into {memory} memory",
                        time.perf_counter() - t0,
                    )
                if differing(dest, reference):
                    wrong.append(transport)
                if round_ == args.repeat - 1:
                    print(f"client: {report.summary()}")
                del dest

            t0 = time.perf_counter()
            out = str(args.workdir / "pulled")
            pull = subprocess.run(
                [NETLOADER, "pull", address, "--out", out, "--model", "demo"],
                capture_output=True,
                text=True,
                check=True,
            )
            sample(CLI, time.perf_counter() - t0)
        print(pull.stdout.strip())
        print(f"bit-identical to the checkpoint on disk: {not wrong} (every pull checked)")

        order = [n for n in results if n.startswith("netloader pull over")] + [WARM, COLD, CLI]
        size = ckpt.stat().st_size
        print(
            f"\n{size / 1e9:.2f} GB; median of {args.repeat} runs per row, rows interleaved; "
            f"{os.cpu_count()} CPUs, load average {load_before:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end"
        )
        print("| path | median s | min - max s | GB/s |\n| --- | ---: | ---: | ---: |")
        for name in order:
            seconds = statistics.median(results[name])
            spread = f"{min(results[name]):.3f} - {max(results[name]):.3f}"
            print(f"| {name} | {seconds:.3f} | {spread} | {size / seconds / 1e9:.2f} |")
        print()
        print(explain(results, cached))
        (args.workdir / "demo.json").write_text(
            json.dumps({"results": results, "page_cache_fraction": cached}, indent=1)
        )
        if wrong:
            sys.exit(f"demo: weights pulled over {', '.join(wrong)} differ from the checkpoint")
    finally:
        server.stop(timeout=20)


if __name__ == "__main__":
    main()
