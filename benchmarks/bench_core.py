"""Core benchmark: netloader against the raw paths it is built on, for the same bytes.

Measures, in one run on loopback (127.0.0.1 only), moving one safetensors checkpoint:

  (a) raw paths between two processes: plain TCP (sendall of memoryviews -> recv_into
      straight into a preallocated uint8 tensor) and gloo send/recv (TCPStore +
      ProcessGroupGloo built without the default group, a window of outstanding ops),
      plus single-process memcpy (torch copy_) as a reference. Rows marked "reference"
      add netloader's integrity check (xxh3-128 per chunk) to a raw path, to show what
      verification costs; they are not candidates for "best raw path";
  (b) netloader: a real `netloader serve` subprocess, pulled from this process with
      Client.load_into (verification on) over each transport, first into freshly
      allocated tensors, then repeatedly into the same touched tensors; and the CLI
      `netloader pull --out DIR` to disk;
  (c) what users do today: safetensors.torch.load_file, warm and cold page cache. Since
      safetensors 0.7 load_file only maps the file; the bytes are read when a loader copies
      them into the model, so that copy is timed too.

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
import gc
import itertools
import json
import math
import multiprocessing as mp
import os
import platform
import queue
import re
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from safetensors.torch import load_file, save_file

from netloader.client import Client
from netloader.manifest import Identity

CHUNK_BYTES = 16 << 20  # the chunk size of the raw paths (netloader's default chunk too)
GLOO_WINDOW = 4  # outstanding send/recv ops on the raw gloo path
RECV_PIECE = 128 << 10  # the bounded-recv variant of raw TCP reads at most this per call
ALIGN = 64  # byte alignment of each tensor inside a fresh destination region
MODEL_NAME = "bench-model"  # checkpoint directory name, which `netloader serve` serves as
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
CHILD_START_TIMEOUT = 120.0  # a raw sender loads and pre-faults the checkpoint first
SERVER_START_TIMEOUT = 300.0
SUBPROCESS_TIMEOUT = 600.0
IO_TIMEOUT = 60.0  # socket / store / process-group timeout on the raw paths
PULL_SUMMARY = re.compile(
    r"netloader: pulled (\d+) tensors, (\d+) bytes in ([0-9.]+) s \(([0-9.]+) GB/s\)"
)
SERVING_LINE = re.compile(r"netloader: serving (\S+) \(.*\) on (\S+):(\d+)\s*$")


# ---- the checkpoint -----------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


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


def llama_like_specs(target_bytes: int) -> list[TensorSpec]:
    """A decoder-only model's tensors (GQA attention with qkv biases, gated MLP, norms in
    fp32, embeddings in bf16, an fp32 lm_head), with layers added until `target_bytes`."""
    hidden, inter, kv, rot = 2048, 5632, 512, 64
    # Keep the vocabulary matrices under ~40% of small targets so layers still appear.
    vocab = max(256, min(32000, int(0.4 * target_bytes / (hidden * 6))))
    bf16, fp32 = torch.bfloat16, torch.float32

    def spec(name: str, dtype: torch.dtype, *shape: int) -> TensorSpec:
        return TensorSpec(name, dtype, shape, math.prod(shape) * dtype.itemsize)

    specs = [spec("model.embed_tokens.weight", bf16, vocab, hidden)]
    tail = [spec("model.norm.weight", fp32, hidden), spec("lm_head.weight", fp32, vocab, hidden)]
    layer = 0
    while sum(s.nbytes for s in specs + tail) < target_bytes:
        p = f"model.layers.{layer}."
        specs += [
            spec(p + "input_layernorm.weight", fp32, hidden),
            spec(p + "self_attn.q_proj.weight", bf16, hidden, hidden),
            spec(p + "self_attn.q_proj.bias", bf16, hidden),
            spec(p + "self_attn.k_proj.weight", bf16, kv, hidden),
            spec(p + "self_attn.k_proj.bias", bf16, kv),
            spec(p + "self_attn.v_proj.weight", bf16, kv, hidden),
            spec(p + "self_attn.v_proj.bias", bf16, kv),
            spec(p + "self_attn.o_proj.weight", bf16, hidden, hidden),
            spec(p + "self_attn.rotary_emb.inv_freq", fp32, rot),
            spec(p + "post_attention_layernorm.weight", fp32, hidden),
            spec(p + "mlp.gate_proj.weight", bf16, inter, hidden),
            spec(p + "mlp.up_proj.weight", bf16, inter, hidden),
            spec(p + "mlp.down_proj.weight", bf16, hidden, inter),
        ]
        layer += 1
    return specs + tail


def write_checkpoint(model_dir: Path, target_bytes: int, seed: int = 0) -> Path:
    """Random weights of a realistic shape mix, saved as `<model_dir>/model.safetensors`."""
    model_dir.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        s.name: torch.randn(s.shape, generator=generator, dtype=s.dtype) * 0.02
        for s in llama_like_specs(target_bytes)
    }
    path = model_dir / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(length of the header block including its 8-byte size, header JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def read_layout(path: Path) -> Layout:
    _, header = read_header(path)
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"),
        key=lambda kv: kv[1]["data_offsets"][0],
    )
    specs = []
    for name, entry in entries:
        start, end = entry["data_offsets"]
        specs.append(
            TensorSpec(name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]), end - start)
        )
    return Layout(tuple(specs))


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
        xxhash.xxh3_64_intdigest(memoryview(flat_u8(t).numpy()))


def check_flat(dest: torch.Tensor, source: dict[str, torch.Tensor], layout: Layout) -> None:
    for t, off in zip(layout.tensors, layout.offsets(), strict=True):
        if not torch.equal(dest[off : off + t.nbytes], flat_u8(source[t.name])):
            raise RuntimeError(f"received bytes of {t.name} differ from the source")


# ---- results ------------------------------------------------------------------------------


@dataclass
class Result:
    section: str  # "a", "b" or "c"
    path: str
    seconds: float | None  # the representative time (median or single); None if skipped
    samples: list[float] = field(default_factory=list)
    raw: bool = False  # an inter-process raw path, eligible as "best raw path"
    note: str = ""


def median_result(section: str, path: str, samples: list[float], **kw: Any) -> Result:
    note = kw.pop("note", "")
    spread = f"median of {len(samples)}, min {min(samples):.3f} max {max(samples):.3f}"
    return Result(section, path, statistics.median(samples), samples, note=f"{spread}{note}", **kw)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


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
    whole = [memoryview(flat_u8(tensors[t.name]).numpy()) for t in layout.tensors]
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


def _start_child(target: Callable[..., None], *args: Any) -> tuple[Any, PipeEnd, int]:
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child_end), daemon=True)
    proc.start()
    child_end.close()
    if not parent_end.poll(CHILD_START_TIMEOUT):
        raise RuntimeError(f"{target.__name__} did not start in {CHILD_START_TIMEOUT} s")
    status, value = parent_end.recv()
    if status != "ready":
        raise RuntimeError(f"{target.__name__} failed:\n{value}")
    return proc, parent_end, int(value)


def _stop_child(proc: Any, pipe: PipeEnd, ok: bool) -> None:
    """Let a child that finished its rounds exit; end one that did not at once."""
    proc.join(IO_TIMEOUT if ok else 1)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    with contextlib.suppress(EOFError, OSError):
        while pipe.poll(0):  # a child's error report, if it sent one before exiting
            status, value = pipe.recv()
            if status == "error":
                print(f"warning: raw sender failed:\n{value}", file=sys.stderr)
    pipe.close()


def interleaved(rounds: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Time each variant `repeat` times, alternating variants, so that slow drift of a
    noisy machine hits every variant alike."""
    samples: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(repeat):
        for name, fn in rounds.items():
            samples[name].append(timed(fn))
    return samples


def bench_raw_tcp(
    ckpt: Path, source: dict[str, torch.Tensor], layout: Layout, repeat: int
) -> list[Result]:
    """Raw TCP, received two ways: recv_into the whole remaining destination, or at most
    RECV_PIECE per call. Two more variants are references for the cost of verification, not
    raw paths: each 16 MiB chunk received and then hashed with xxh3-128 in a second pass (what
    netloader does), and each piece hashed by a streaming xxh3-128 right after it arrives,
    while its bytes are still in cache."""
    variants = ("whole", "pieces", "verify", "stream")
    proc, pipe, port = _start_child(tcp_sender, str(ckpt), 1 + len(variants) * repeat)
    ok = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
            sock.settimeout(None)
            _set_io_timeouts(sock, IO_TIMEOUT)
            dest = fresh_region(layout.total_bytes)
            view = memoryview(dest.numpy())
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
        _stop_child(proc, pipe, ok)
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
    opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    opts._timeout = datetime.timedelta(seconds=IO_TIMEOUT)
    return dist.ProcessGroupGloo(dist.PrefixStore("raw/", store), rank, 2, opts)


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
        store = dist.TCPStore(  # type: ignore[attr-defined]
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
    proc, pipe, port = _start_child(gloo_sender, str(ckpt), 1 + 2 * repeat)
    group = None
    ok = False
    try:
        store = dist.TCPStore(  # type: ignore[attr-defined]
            "127.0.0.1", port, 2, False, timeout=datetime.timedelta(seconds=IO_TIMEOUT)
        )
        group = _gloo_group(store, 1)
        dest = fresh_region(layout.total_bytes)
        targets = [dest[off : off + n] for _, _, off, n in layout.chunks()]
        rounds = itertools.count()

        def one_round(verify: bool = False) -> None:
            store.set(f"go{next(rounds)}", b"1")
            pending: deque[tuple[Any, torch.Tensor]] = deque()

            def finish() -> None:
                work, target = pending.popleft()
                work.wait()
                if verify:
                    xxhash.xxh3_128_hexdigest(memoryview(target.numpy()))

            for target in targets:
                pending.append((group.recv([target], 0, 0), target))
                if len(pending) >= GLOO_WINDOW:
                    finish()
            while pending:
                finish()

        first = timed(one_round)
        warm = interleaved({"plain": one_round, "verify": lambda: one_round(True)}, repeat)
        store.set("done", b"1")
        ok = True
        check_flat(dest, source, layout)
    finally:
        if group is not None:
            _shutdown_group(group)
        _stop_child(proc, pipe, ok)
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


def netloader_exe() -> str:
    beside = Path(sys.executable).parent / "netloader"
    found = str(beside) if beside.exists() else shutil.which("netloader")
    if not found:
        raise RuntimeError("the `netloader` command is not installed next to this Python")
    return found


class ServerProcess:
    """`netloader serve DIR --listen 127.0.0.1:0` as a subprocess; its address comes from
    the "netloader: serving ... on HOST:PORT" line it prints."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [netloader_exe(), "serve", str(model_dir), "--listen", "127.0.0.1:0", *extra_args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            self.model, self.address = self._wait_for_address()
        except BaseException:
            self.stop()
            raise

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _wait_for_address(self) -> tuple[str, str]:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                raise RuntimeError(f"netloader serve exited early: {self.log_tail()}")
            if match := SERVING_LINE.match(line.strip()):
                return match[1], f"{match[2]}:{match[3]}"
        raise RuntimeError(f"netloader serve printed no address: {self.log_tail()}")

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the CLI stops its server cleanly
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._log.close()


def bench_netloader_pulls(
    address: str,
    model: str,
    source: dict[str, torch.Tensor],
    layout: Layout,
    transport: str,
    repeat: int,
) -> list[Result]:
    client = Client([address], transport=transport)
    client.manifest()  # waits until the server's digests are ready: not part of a pull
    identity = Identity(model)
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
    (src_len, src_hdr), (dst_len, dst_hdr) = read_header(src), read_header(pulled)
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
    cmd = [netloader_exe(), "pull", address, "--out", str(out_dir), "--transport", transport]
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


def drop_page_cache() -> str | None:
    """Empty the page cache; returns why it cannot, or None once done."""
    if os.geteuid() != 0:
        return "skipped: not root"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"skipped: cannot write /proc/sys/vm/drop_caches ({exc.strerror})"
    return None


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


def best_raw(results: Sequence[Result]) -> Result:
    candidates = [r for r in results if r.raw and r.seconds]
    if not candidates:
        raise RuntimeError("no raw path was measured")
    return min(candidates, key=lambda r: r.seconds or math.inf)


def table(results: Sequence[Result], nbytes: int) -> Iterator[str]:
    best = best_raw(results)
    assert best.seconds is not None
    yield f"{nbytes} bytes ({nbytes / 2**30:.2f} GiB) per transfer; % = of {best.path}\n"
    yield "| part | path | seconds | GB/s | % of best raw | note |"
    yield "|---|---|---:|---:|---:|---|"
    for r in results:
        if r.seconds is None:
            yield f"| {r.section} | {r.path} | - | - | - | {r.note} |"
            continue
        gbps = nbytes / r.seconds / 1e9
        pct = 100 * best.seconds / r.seconds
        yield (f"| {r.section} | {r.path} | {r.seconds:.3f} | {gbps:.2f} | {pct:.0f}% | {r.note} |")


def verdict(results: Sequence[Result]) -> tuple[bool, str]:
    best = best_raw(results)
    assert best.seconds is not None
    pulls = [r for r in results if r.path.startswith("netloader ") and "repeated pulls" in r.path]
    if not pulls:
        return False, "netloader in-memory pull: not measured"
    top = min(pulls, key=lambda r: r.seconds or math.inf)
    assert top.seconds is not None
    pct = 100 * best.seconds / top.seconds
    reached = pct >= 90
    firsts = ", ".join(
        f"{r.path.split(':')[0]} first pull {100 * best.seconds / r.seconds:.0f}%"
        for r in results
        if r.path.startswith("netloader ") and "first pull" in r.path and r.seconds
    )
    line = (
        f"RESULT: netloader's in-memory pull {'REACHED' if reached else 'did NOT reach'} 90% "
        f"of the best raw path: {top.path} at {pct:.0f}% of {best.path} "
        f"({firsts}; first pulls go into untouched memory)"
    )
    return reached, line


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
        "--transports", default="tcp,gloo", help="comma-separated subset of tcp,gloo"
    )
    args = parser.parse_args(argv)
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(args.transports) - {"tcp", "gloo"}
    if unknown or not args.transports:
        parser.error(f"--transports: choose from tcp,gloo (got {args.transports})")
    if args.repeat < 1 or args.size_gib <= 0:
        parser.error("--repeat must be >= 1 and --size-gib > 0")
    return args


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    progress(f"writing a {args.size_gib} GiB checkpoint under {workdir} ...")
    ckpt = write_checkpoint(workdir / MODEL_NAME, int(args.size_gib * 2**30))
    layout = read_layout(ckpt)
    source = load_file(ckpt)
    prefault(source)
    results: list[Result] = []

    progress("(a) memcpy ...")
    results += bench_memcpy(source, layout, args.repeat)
    raw_benches = {"tcp": bench_raw_tcp, "gloo": bench_raw_gloo}
    for transport in args.transports:
        progress(f"(a) raw {transport} ...")
        results += raw_benches[transport](ckpt, source, layout, args.repeat)
        gc.collect()

    server = ServerProcess(ckpt.parent, workdir / "server.log")
    checks: dict[str, FileCheck] = {}
    try:
        for transport in args.transports:
            progress(f"(b) netloader {transport} in memory ...")
            results += bench_netloader_pulls(
                server.address, server.model, source, layout, transport, args.repeat
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
    }


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


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
