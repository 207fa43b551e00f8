"""Core benchmark: netloader against the raw paths it is built on, for the same bytes.

Measures, in one run on loopback (127.0.0.1 only), moving one safetensors checkpoint:

  (a) raw paths between two processes: plain TCP (sendall of memoryviews -> recv_into
      straight into a preallocated uint8 tensor) and gloo send/recv (TCPStore +
      ProcessGroupGloo built without the default group, a window of outstanding ops),
      plus single-process memcpy (torch copy_) as a reference, and process_vm_readv out of
      another process's memory (the same-host path's limit) on 1 and 2 threads. Rows
      marked "reference" add netloader's integrity check (xxh3-128 per chunk) to a raw
      path, to show what verification costs; they are not candidates for "best raw path";
  (b) netloader: a real `netloader serve` subprocess, pulled from this process with
      Client.load_into (verification on) over each transport, first into freshly
      allocated tensors, then repeatedly into the same touched tensors; and the CLI
      `netloader pull --out DIR` to disk;
  (c) what users do today: safetensors.torch.load_file, warm and cold page cache. Since
      safetensors 0.7 load_file only maps the file; the bytes are read when a loader copies
      them into the model, so that copy is timed too;
  (d) the tensor count as an axis (tensor_counts.py): the same bytes as 16, 1,000, 8,000
      and 64,000 tensors, pulled over tcp and same-host, beside safetensors and the
      verified-copy limit, all in the same run (`--sections d` runs it alone).

Sources on both sides are the checkpoint as load_file returns it, read once beforehand
(the netloader server does the same when it computes digests). "Fresh" destinations are
new anonymous mappings, so their first write page-faults, as a just-built model's would.

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_core.py --size-gib 1 --json /tmp/bench.json

This is a benchmark command, not a test. On a 2-core machine run nothing else heavy
at the same time; every measurement runs in sequence.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import itertools
import json
import os
import platform
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors.torch import load_file
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, TCPStore

from common import (
    Result,
    best_raw,
    drop_page_cache,
    interleaved,
    median_result,
    progress,
    same_host_verdict,
    serve_checkpoint,
    start_child,
    stop_child,
    table,
    timed,
    verdict,
)
from netloader import Client
from netloader.testing.models import (
    TensorSpec,
    checkpoint_specs,
    llama_like,
    read_safetensors_header,
    write_checkpoint,
)
from netloader.testing.processes import netloader_command
from netloader.transports import nixl, process_memory, same_host
from tensor_counts import COUNTS, run_counts

TRANSPORTS = ("tcp", "same-host", "gloo", "nixl")
CHUNK_BYTES = 16 << 20  # the chunk size of the raw paths (netloader's default chunk too)
GLOO_WINDOW = 4  # outstanding send/recv ops on the raw gloo path
RECV_PIECE = 128 << 10  # the bounded-recv variant of raw TCP reads at most this per call
READ_PIECE = 1 << 20  # the streaming-hash variant of process_vm_readv reads this per call
ALIGN = 64  # byte alignment of each tensor inside a fresh destination region
MODEL_NAME = "bench-model"  # checkpoint directory name, which `netloader serve` serves as
SUBPROCESS_TIMEOUT = 600.0
IO_TIMEOUT = 60.0  # socket / store / process-group timeout on the raw paths
PULL_SUMMARY = re.compile(
    r"netloader: pulled (\d+) tensors, (\d+) bytes in ([0-9.]+) s \(([0-9.]+) GB/s\)"
)


# ---- the checkpoint -----------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The tensors of the checkpoint in file order, as `load_file` returns them."""

    tensors: tuple[TensorSpec, ...]

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def offsets(self) -> list[int]:
        """Each tensor's offset in the concatenation of all tensor bytes."""
        out, position = [], 0
        for t in self.tensors:
            out.append(position)
            position += t.nbytes
        return out

    def chunks(self) -> list[tuple[int, int, int, int]]:
        """(tensor index, offset in tensor, offset in concatenation, length) of every
        CHUNK_BYTES chunk, chunked per tensor the way netloader chunks."""
        out = []
        for i, (t, base) in enumerate(zip(self.tensors, self.offsets(), strict=True)):
            for start in range(0, t.nbytes, CHUNK_BYTES):
                out.append((i, start, base + start, min(CHUNK_BYTES, t.nbytes - start)))
        return out


def read_layout(path: Path) -> Layout:
    return Layout(tuple(checkpoint_specs(path)))


def flat_u8(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def fresh_region(nbytes: int) -> torch.Tensor:
    """A uint8 tensor no one has touched yet, allocated the way a model's parameters are
    (torch.empty: an allocation this large is a new private anonymous mapping)."""
    return torch.empty(nbytes, dtype=torch.uint8)


def fresh_tensors(layout: Layout) -> dict[str, torch.Tensor]:
    """Freshly allocated, untouched destination tensors for every tensor of `layout`."""
    offsets, position = [], 0
    for t in layout.tensors:
        position += -position % ALIGN
        offsets.append(position)
        position += t.nbytes
    region = fresh_region(position)
    return {
        t.name: region[off : off + t.nbytes].view(t.dtype).reshape(t.shape)
        for t, off in zip(layout.tensors, offsets, strict=True)
    }


def prefault(tensors: dict[str, torch.Tensor]) -> None:
    """Read every byte once (the netloader server does the same when it digests)."""
    for t in tensors.values():
        xxhash.xxh3_64_intdigest(flat_u8(t).numpy().data)


def check_flat(dest: torch.Tensor, source: dict[str, torch.Tensor], layout: Layout) -> None:
    for t, off in zip(layout.tensors, layout.offsets(), strict=True):
        if not torch.equal(dest[off : off + t.nbytes], flat_u8(source[t.name])):
            raise RuntimeError(f"received bytes of {t.name} differ from the source")


# ---- (a) memcpy ---------------------------------------------------------------------------


def bench_memcpy(source: dict[str, torch.Tensor], layout: Layout, repeat: int) -> list[Result]:
    chunks = layout.chunks()
    flats = [flat_u8(source[t.name]) for t in layout.tensors]

    def copy_all(dest: torch.Tensor) -> None:
        for tensor, start, off, length in chunks:
            dest[off : off + length].copy_(flats[tensor][start : start + length])

    dest = fresh_region(layout.total_bytes)
    first = timed(lambda: copy_all(dest))
    warm = [timed(lambda: copy_all(dest)) for _ in range(repeat)]
    check_flat(dest, source, layout)
    return [
        median_result("a", "memcpy: torch copy_, 1 process, touched destination", warm),
        Result("a", "memcpy: torch copy_, fresh destination", first, [first], note="single"),
    ]


# ---- (a) raw process_vm_readv (the same-host path's limit) --------------------------------


def memory_holder(path: str, pipe: PipeEnd) -> None:
    """Child process: hold the checkpoint in memory and say where each chunk is."""
    try:
        tensors, _views = _source_views(path)
        layout = read_layout(Path(path))
        flats = [flat_u8(tensors[t.name]) for t in layout.tensors]
        pipe.send(("ready", os.getpid()))
        pipe.send([flats[i].data_ptr() + start for i, start, _, _ in layout.chunks()])
        pipe.recv()  # until the reader is done
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def bench_raw_process_vm_readv(
    ckpt: Path, source: dict[str, torch.Tensor], layout: Layout, repeat: int
) -> list[Result]:
    """Every chunk copied out of another process with process_vm_readv (one kernel copy per
    call) into touched memory, on 1 thread and on a pool of threads as the same-host
    transport reads (2, and its READERS when that differs): without the check, with the
    per-chunk xxh3 check after each chunk is read (what netloader does), with each 1 MiB
    piece hashed as soon as it lands, while it is in cache (streaming xxh3), and the check
    alone (the chunks hashed where they lie, nothing read: the cost of the check)."""
    proc, pipe, pid = start_child(memory_holder, str(ckpt))
    ok = False
    try:
        addresses = pipe.recv()
        chunks = [
            (off, length, address)
            for (_, _, off, length), address in zip(layout.chunks(), addresses, strict=True)
        ]
        dest = fresh_region(layout.total_bytes)
        dest.fill_(0)
        base = dest.data_ptr()
        view = dest.numpy().data

        def read_chunk(off: int, length: int, address: int, check: str) -> None:
            if check == "piece":
                hasher = xxhash.xxh3_128()
                for start in range(0, length, READ_PIECE):
                    n = min(READ_PIECE, length - start)
                    process_memory.read(pid, base + off + start, address + start, n)
                    hasher.update(view[off + start : off + start + n])
                hasher.digest()
                return
            if check != "hash":
                process_memory.read(pid, base + off, address, length)
            if check in ("chunk", "hash"):
                xxhash.xxh3_128(view[off : off + length]).digest()

        threads = sorted({1, 2, same_host.READERS})
        pools = {n: ThreadPoolExecutor(n) for n in threads if n > 1}

        def read_all(n: int, check: str) -> None:
            if n == 1:
                for chunk in chunks:
                    read_chunk(*chunk, check)
                return
            # map submits every chunk at once; list() re-raises the first failed read.
            list(pools[n].map(lambda chunk: read_chunk(*chunk, check), chunks))

        checks = ("plain", "chunk", "piece", "hash")
        try:
            samples = interleaved(
                {
                    f"{n}/{check}": functools.partial(read_all, n, check)
                    for n in threads
                    for check in checks
                },
                repeat,
            )
        finally:
            for pool in pools.values():
                pool.shutdown()
        check_flat(dest, source, layout)
        pipe.send("done")
        ok = True
    finally:
        stop_child(proc, pipe, ok)
    piece = f"{READ_PIECE >> 20} MiB"
    results: list[Result] = []
    for n in threads:
        label = f"{n} thread{'s' if n > 1 else ''}"
        results += [
            median_result(
                "a", f"raw process_vm_readv, {label}, touched destination", samples[f"{n}/plain"]
            ),
            median_result(
                "a",
                f"reference: raw process_vm_readv + xxh3-128 per chunk, {label}",
                samples[f"{n}/chunk"],
            ),
            median_result(
                "a",
                f"reference: raw process_vm_readv + streaming xxh3-128 per {piece} piece, {label}",
                samples[f"{n}/piece"],
            ),
            median_result(
                "a",
                f"reference: xxh3-128 per chunk alone (no copy, in memory), {label}",
                samples[f"{n}/hash"],
            ),
        ]
    return results


# ---- (a) raw TCP --------------------------------------------------------------------------


def _set_io_timeouts(sock: socket.socket, seconds: float) -> None:
    """Kernel-side timeouts: the socket stays blocking (one syscall per recv, as raw as
    Python gets) yet a dead peer cannot hang the benchmark."""
    timeval = struct.pack("ll", int(seconds), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _source_views(path: str) -> tuple[dict[str, torch.Tensor], list[memoryview]]:
    """The checkpoint loaded as users load it, pre-faulted, and a memoryview per chunk."""
    tensors = load_file(path)
    prefault(tensors)
    layout = read_layout(Path(path))
    whole = [flat_u8(tensors[t.name]).numpy().data for t in layout.tensors]
    views = [whole[i][start : start + n] for i, start, _, n in layout.chunks()]
    return tensors, views


def tcp_sender(path: str, rounds: int, pipe: PipeEnd) -> None:
    """Child process: serve `rounds` full passes over a plain TCP socket, one per go byte."""
    try:
        _tensors, views = _source_views(path)
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(IO_TIMEOUT)
            pipe.send(("ready", listener.getsockname()[1]))
            sock, _ = listener.accept()
        with sock:
            sock.settimeout(None)
            _set_io_timeouts(sock, IO_TIMEOUT)
            for _ in range(rounds):
                if sock.recv(1) != b"g":
                    raise RuntimeError("receiver went away")
                for view in views:
                    sock.sendall(view)
            sock.recv(1)  # the receiver closes when done
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def bench_raw_tcp(
    ckpt: Path, source: dict[str, torch.Tensor], layout: Layout, repeat: int
) -> list[Result]:
    """Raw TCP, received two ways: recv_into the whole remaining destination, or at most
    RECV_PIECE per call. Two more variants are references for the cost of verification, not
    raw paths: each 16 MiB chunk received and then hashed with xxh3-128 in a second pass (what
    netloader does), and each piece hashed by a streaming xxh3-128 right after it arrives,
    while its bytes are still in cache."""
    variants = ("whole", "pieces", "verify", "stream")
    proc, pipe, port = start_child(tcp_sender, str(ckpt), 1 + len(variants) * repeat)
    ok = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.settimeout(None)
            _set_io_timeouts(sock, IO_TIMEOUT)
            dest = fresh_region(layout.total_bytes)
            view = dest.numpy().data
            chunks = layout.chunks()

            def receive(into: memoryview, piece: int, hasher: Any = None) -> None:
                got, size = 0, len(into)
                while got < size:
                    n = sock.recv_into(into[got:], min(piece, size - got))
                    if n == 0:
                        raise RuntimeError("raw TCP sender closed early")
                    if hasher is not None:
                        hasher.update(into[got : got + n])
                    got += n

            def whole() -> None:
                sock.sendall(b"g")
                receive(view, len(view))

            def pieces() -> None:
                sock.sendall(b"g")
                receive(view, RECV_PIECE)

            def verify() -> None:
                sock.sendall(b"g")
                for _, _, off, length in chunks:
                    receive(view[off : off + length], length)
                    xxhash.xxh3_128_hexdigest(view[off : off + length])

            def stream() -> None:
                sock.sendall(b"g")
                for _, _, off, length in chunks:
                    hasher = xxhash.xxh3_128()
                    receive(view[off : off + length], RECV_PIECE, hasher)
                    hasher.hexdigest()

            first = timed(whole)
            warm = interleaved(
                {"whole": whole, "pieces": pieces, "verify": verify, "stream": stream}, repeat
            )
        ok = True
        check_flat(dest, source, layout)
    finally:
        stop_child(proc, pipe, ok)
    piece = f"{RECV_PIECE >> 10} KiB"
    return [
        median_result(
            "a", "raw tcp: sendall -> recv_into, touched destination", warm["whole"], raw=True
        ),
        median_result(
            "a", f"raw tcp: recv_into <= {piece} per call, touched", warm["pieces"], raw=True
        ),
        median_result(
            "a",
            "raw tcp + xxh3-128 per 16 MiB chunk (reference: cost of verifying)",
            warm["verify"],
        ),
        median_result(
            "a",
            f"raw tcp + streaming xxh3-128 per {piece} piece (reference: verify in cache)",
            warm["stream"],
        ),
        Result("a", "raw tcp: fresh destination", first, [first], note="single"),
    ]


# ---- (a) raw gloo -------------------------------------------------------------------------


def _gloo_group(store: Any, rank: int) -> Any:
    gloo: Any = ProcessGroupGloo  # its stub lacks the _Options this torch has
    opts = gloo._Options()
    opts._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = datetime.timedelta(seconds=IO_TIMEOUT)
    return gloo(PrefixStore("raw/", store), rank, 2, opts)


def _shutdown_group(group: Any) -> None:
    with contextlib.suppress(RuntimeError):
        if hasattr(group, "shutdown"):
            group.shutdown()


def gloo_sender(path: str, rounds: int, pipe: PipeEnd) -> None:
    """Child process (rank 0, store master): `rounds` full passes, each after a go key."""
    try:
        tensors, _ = _source_views(path)
        layout = read_layout(Path(path))
        flats = [flat_u8(tensors[t.name]) for t in layout.tensors]
        chunks = [flats[i][start : start + n] for i, start, _, n in layout.chunks()]
        store = TCPStore(
            "127.0.0.1",
            0,
            2,
            True,
            timeout=datetime.timedelta(seconds=IO_TIMEOUT),
            wait_for_workers=False,
        )
        pipe.send(("ready", store.port))
        group = _gloo_group(store, 0)
        try:
            for r in range(rounds):
                store.get(f"go{r}")
                pending: deque[Any] = deque()
                for chunk in chunks:
                    pending.append(group.send([chunk], 1, 0))
                    if len(pending) >= GLOO_WINDOW:
                        pending.popleft().wait()
                while pending:
                    pending.popleft().wait()
            store.get("done")
        finally:
            _shutdown_group(group)
    except BaseException:
        pipe.send(("error", traceback.format_exc()))
        raise


def bench_raw_gloo(
    ckpt: Path, source: dict[str, torch.Tensor], layout: Layout, repeat: int
) -> list[Result]:
    proc, pipe, port = start_child(gloo_sender, str(ckpt), 1 + 2 * repeat)
    group = None
    ok = False
    try:
        store = TCPStore(
            "127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=IO_TIMEOUT)
        )
        group = _gloo_group(store, 1)
        dest = fresh_region(layout.total_bytes)
        targets = [dest[off : off + n] for _, _, off, n in layout.chunks()]
        rounds = itertools.count()

        def one_round(verify: bool = False) -> None:
            store.set(f"go{next(rounds)}", "1")
            pending: deque[tuple[Any, torch.Tensor]] = deque()

            def finish() -> None:
                work, target = pending.popleft()
                work.wait()
                if verify:
                    xxhash.xxh3_128_hexdigest(target.numpy().data)

            for target in targets:
                pending.append((group.recv([target], 0, 0), target))
                if len(pending) >= GLOO_WINDOW:
                    finish()
            while pending:
                finish()

        first = timed(one_round)
        warm = interleaved({"plain": one_round, "verify": lambda: one_round(True)}, repeat)
        store.set("done", "1")
        ok = True
        check_flat(dest, source, layout)
    finally:
        if group is not None:
            _shutdown_group(group)
        stop_child(proc, pipe, ok)
    return [
        median_result(
            "a",
            f"raw gloo: send/recv, window {GLOO_WINDOW}, touched destination",
            warm["plain"],
            raw=True,
        ),
        median_result(
            "a", "raw gloo + xxh3-128 per chunk (reference: cost of verifying)", warm["verify"]
        ),
        Result("a", "raw gloo: fresh destination", first, [first], note="single"),
    ]


# ---- (b) netloader ------------------------------------------------------------------------


def bench_netloader_pulls(
    address: str,
    model: str,
    source: dict[str, torch.Tensor],
    layout: Layout,
    transport: str,
    repeat: int,
) -> list[Result]:
    client = Client([address], transport=transport)
    # Waits until the server's digests are ready (not part of a pull); a served checkpoint's
    # identity is its name plus what it is (`checkpoint.checkpoint_identity`).
    identity = client.manifest().identity
    assert identity.model == model
    dest = fresh_tensors(layout)
    reported: list[float] = []

    def pull() -> None:
        reported.append(client.load_into(dest, identity).seconds)

    first = timed(pull)
    for name, tensor in dest.items():  # once, outside the timing (digests were checked)
        if not torch.equal(flat_u8(tensor), flat_u8(source[name])):
            raise RuntimeError(f"netloader delivered wrong bytes for {name}")
    warm = [timed(pull) for _ in range(repeat)]
    note = f"; LoadReport says {statistics.median(reported[1:]):.3f} s"
    return [
        Result(
            "b",
            f"netloader {transport}: first pull, fresh tensors",
            first,
            [first],
            note=f"single; LoadReport says {reported[0]:.3f} s",
        ),
        median_result(
            "b", f"netloader {transport}: repeated pulls, touched tensors", warm, note=note
        ),
    ]


@dataclass
class FileCheck:
    identical_file: bool
    identical_tensor_bytes: bool
    identical_tensor_headers: bool
    detail: str


def compare_checkpoints(src: Path, pulled: Path) -> FileCheck:
    """Bit-compare the pulled file with the source; if the files differ, say where."""
    same_file = src.stat().st_size == pulled.stat().st_size and _same_bytes(src, pulled)
    src_len, src_hdr = read_safetensors_header(src)
    dst_len, dst_hdr = read_safetensors_header(pulled)
    meta_src, meta_dst = src_hdr.pop("__metadata__", {}), dst_hdr.pop("__metadata__", {})
    same_headers = src_hdr == dst_hdr
    same_data = same_headers and _same_bytes(src, pulled, src_len, dst_len)
    detail = "files are bit-identical"
    if not same_file:
        detail = (
            f"files differ; tensor data region identical: {same_data}; tensor entries "
            f"identical: {same_headers}; __metadata__ source {meta_src} vs pulled {meta_dst}"
        )
    return FileCheck(same_file, same_data, same_headers, detail)


def _same_bytes(a: Path, b: Path, skip_a: int = 0, skip_b: int = 0) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(skip_a)
        fb.seek(skip_b)
        while True:
            block_a, block_b = fa.read(CHUNK_BYTES), fb.read(CHUNK_BYTES)
            if block_a != block_b:
                return False
            if not block_a:
                return True


def bench_cli_pull(
    address: str, ckpt: Path, out_dir: Path, transport: str, repeat: int
) -> tuple[list[Result], FileCheck]:
    walls: list[float] = []
    reported: list[float] = []
    check: FileCheck | None = None
    cmd = [netloader_command(), "pull", address, "--out", str(out_dir), "--transport", transport]
    try:
        for _ in range(repeat):
            shutil.rmtree(out_dir, ignore_errors=True)
            started = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
            walls.append(time.perf_counter() - started)
            if done.returncode != 0:
                raise RuntimeError(f"netloader pull failed: {done.stderr.strip()[-2000:]}")
            match = PULL_SUMMARY.search(done.stdout)
            if match is None:
                raise RuntimeError(f"no summary line in pull output: {done.stdout!r}")
            reported.append(float(match[3]))
            if check is None:
                check = compare_checkpoints(ckpt, out_dir / "model.safetensors")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    assert check is not None
    label = f"netloader pull CLI ({transport}) -> disk"
    return [
        median_result("b", f"{label}: process wall time", walls, note="; includes start-up"),
        median_result("b", f"{label}: its own summary line", reported),
    ], check


# ---- (c) safetensors from disk ------------------------------------------------------------


def bench_load_file(ckpt: Path, layout: Layout, repeat: int) -> list[Result]:
    """load_file alone maps the file lazily (safetensors >= 0.7); a loader then copies every
    tensor into the model's own memory, which is where the bytes are actually read."""
    dest = fresh_tensors(layout)
    for t in dest.values():
        t.zero_()  # touched destination, as in netloader's repeated pulls

    def load_and_copy() -> None:
        loaded = load_file(ckpt)
        for name, tensor in loaded.items():
            dest[name].copy_(tensor)

    def load_only() -> None:
        loaded = load_file(ckpt)
        del loaded

    def load_into_fresh() -> None:
        fresh = fresh_tensors(layout)  # a just-built model, as in netloader's first pull
        for name, tensor in load_file(ckpt).items():
            fresh[name].copy_(tensor)

    load_and_copy()  # warms the page cache
    lazy = [timed(load_only) for _ in range(repeat)]
    warm = [timed(load_and_copy) for _ in range(repeat)]
    warm_fresh = [timed(load_into_fresh) for _ in range(repeat)]
    results = [
        median_result("c", "safetensors load_file alone (lazy mmap), warm cache", lazy),
        median_result("c", "safetensors load_file + copy_ into model tensors, warm cache", warm),
        median_result(
            "c", "safetensors load_file + copy_ into fresh model tensors, warm cache", warm_fresh
        ),
    ]
    cold: list[float] = []
    reason = None
    for _ in range(repeat):
        gc.collect()
        if (reason := drop_page_cache()) is not None:
            break
        cold.append(timed(load_and_copy))
    label = "safetensors load_file + copy_ into model tensors, cold cache"
    if cold:
        results.append(median_result("c", label, cold, note="; after sync + drop_caches"))
    else:
        results.append(Result("c", label, None, note=reason or "skipped"))
    return results


# ---- report -------------------------------------------------------------------------------


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=1.0, help="checkpoint size (>= this)")
    parser.add_argument("--repeat", type=int, default=3, help="repeated runs per measurement")
    parser.add_argument(
        "--workdir", type=Path, default=Path("/tmp"), help="parent of the temporary directory"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--transports", default=",".join(TRANSPORTS), help="comma-separated subset of those"
    )
    parser.add_argument(
        "--sections",
        default="abcd",
        help="which sections to run: a (raw paths), b (netloader), c (safetensors), "
        "d (the tensor-count axis; tcp and same-host only)",
    )
    parser.add_argument(
        "--counts",
        default=",".join(map(str, COUNTS)),
        help="section d: the tensor counts to hold the same bytes as",
    )
    args = parser.parse_args(argv)
    args.counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if not set(args.sections) <= set("abcd") or not args.sections:
        parser.error("--sections: letters from abcd")
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if "nixl" in args.transports and (why := nixl.import_error()) is not None:
        progress(f"skipping nixl: {why}")
        args.transports.remove("nixl")
    unknown = set(args.transports) - set(TRANSPORTS)
    if unknown or not args.transports:
        parser.error(f"--transports: choose from {','.join(TRANSPORTS)} (got {args.transports})")
    if args.repeat < 1 or args.size_gib <= 0:
        parser.error("--repeat must be >= 1 and --size-gib > 0")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    report: dict[str, Any] = {}
    if set(args.sections) & set("abc"):
        report = run_sections_abc(args, workdir)
    if "d" in args.sections:
        load_before = os.getloadavg()[0]
        transports = [t for t in args.transports if t in ("tcp", "same-host")]
        lines, report["tensor_counts"] = run_counts(
            workdir, int(args.size_gib * 2**30), transports, args.repeat, args.counts
        )
        print("\n".join(lines))
        print(
            f"machine: {os.cpu_count()} CPUs, 1-minute load average {load_before:.2f} at "
            f"start, {os.getloadavg()[0]:.2f} at end"
        )
    return report


def run_sections_abc(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    progress(f"writing a {args.size_gib} GiB checkpoint under {workdir} ...")
    ckpt = write_checkpoint(workdir / MODEL_NAME, llama_like(int(args.size_gib * 2**30)))
    layout = read_layout(ckpt)
    source = load_file(ckpt)
    prefault(source)
    results: list[Result] = []

    progress("(a) memcpy ...")
    results += bench_memcpy(source, layout, args.repeat)
    raw_benches = {
        "tcp": bench_raw_tcp,
        "gloo": bench_raw_gloo,
        "same-host": bench_raw_process_vm_readv,
    }
    for transport in args.transports:
        if transport in raw_benches:  # nixl: its netloader rows against tcp's
            progress(f"(a) raw {transport} ...")
            results += raw_benches[transport](ckpt, source, layout, args.repeat)
            gc.collect()

    server = serve_checkpoint(ckpt.parent, workdir / "server.log")
    checks: dict[str, FileCheck] = {}
    try:
        for transport in args.transports:
            progress(f"(b) netloader {transport} in memory ...")
            results += bench_netloader_pulls(
                server.address, server.ready["model"], source, layout, transport, args.repeat
            )
            gc.collect()
        for transport in args.transports:
            progress(f"(b) netloader pull CLI {transport} ...")
            cli, checks[transport] = bench_cli_pull(
                server.address, ckpt, workdir / "pulled", transport, args.repeat
            )
            results += cli
    finally:
        server.stop()

    del source  # a mapped file cannot be dropped from the page cache
    gc.collect()
    progress("(c) safetensors load_file ...")
    results += bench_load_file(ckpt, layout, args.repeat)

    load_after = os.getloadavg()[0]
    print("\n".join(table(results, layout.total_bytes)))
    print()
    print(
        f"machine: {os.cpu_count()} CPUs, 1-minute load average {load_before:.2f} at start, "
        f"{load_after:.2f} at end (other work on the machine skews every figure)"
    )
    for transport, check in checks.items():
        print(f"CLI pull ({transport}) file check: {check.detail}")
    reached, line = verdict(results)
    print(line)
    local_line = same_host_verdict(results)
    print(local_line)
    best = best_raw(results)
    return {
        "config": {
            "size_gib": args.size_gib,
            "repeat": args.repeat,
            "transports": args.transports,
            "chunk_bytes": CHUNK_BYTES,
            "gloo_window": GLOO_WINDOW,
        },
        "environment": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "loadavg_1min_start": load_before,
            "loadavg_1min_end": load_after,
        },
        "bytes": layout.total_bytes,
        "tensors": len(layout.tensors),
        "best_raw_path": best.path,
        "results": [
            {
                **asdict(r),
                "gbps": None if r.seconds is None else layout.total_bytes / r.seconds / 1e9,
                "pct_of_best_raw": None
                if r.seconds is None or best.seconds is None
                else 100 * best.seconds / r.seconds,
            }
            for r in results
        ],
        "cli_file_checks": {t: asdict(c) for t, c in checks.items()},
        "netloader_reached_90pct": reached,
        "verdict": line,
        "same_host_verdict": local_line,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="netloader-bench-", dir=args.workdir))
    try:
        report = run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
