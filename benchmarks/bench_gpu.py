"""Device paths on one CUDA GPU, in one run, written as one JSON file:

- d2d copy:      torch device-to-device copy (the limit for CUDA IPC)
- h2d pinned:    pinned host to device copy (the limit for the client's ring)
- device digest: the device digest's own rate, eager torch ops and torch.compile'd
- tcp -> host / tcp -> cuda: pulls over loopback tcp from a server of host tensors into
                 host tensors and into CUDA tensors (through the client's ring)
- tcp, cuda server -> cuda: a server of CUDA tensors (through its ring) into CUDA tensors
- cuda-ipc -> cuda (verified): CUDA IPC from a server of CUDA tensors, every chunk copied
                 device to device and checked with the device digest (eager, compiled,
                 and the default: eager until the compiled one is ready)

Rates are bytes moved (one way) per second, GB/s; a pull's is the tensors' bytes over its
wall time (start-up included). Targets (issue 23, for an H200): CUDA IPC verified >= 50%
of the d2d copy rate, tcp into CUDA >= 90% of tcp into host, device digest >= 1000 GB/s.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py --gib 2 --json runs/bench_gpu.json

`serve` is the server process this script starts for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import netloader
from netloader import device_digest as dd
from netloader.manifest import Manifest
from netloader.testing.processes import ServerProcess
from netloader.transports import cuda_ipc

SECRET = "bench_gpu: a shared secret of decent length"
READY = r"^ADDR (?P<address>\S+)$"
BLOCK = 256 << 20
IPC_ROWS = {
    "eager": "cuda_ipc_verified_eager_digest",
    "compiled": "cuda_ipc_verified_compiled_digest",
    "auto": "cuda_ipc_verified",
}


def progress(message: str) -> None:
    print(f"[bench_gpu] {message}", file=sys.stderr, flush=True)


# ---- the server process -------------------------------------------------------------------


def serve(device: str, gib: float, chunk_mib: int) -> None:
    """Serve `gib` GiB of random uint8 blocks from `device` until SIGTERM."""
    tensors = {
        f"block.{i}": torch.empty(BLOCK, dtype=torch.uint8, device=device).random_(0, 256)
        for i in range(max(1, int(gib * (1 << 30)) // BLOCK))
    }
    server = netloader.serve(tensors, "bench", secret=SECRET, chunk_bytes=chunk_mib << 20)
    server.manifest()  # digests computed before we announce ourselves
    print(f"ADDR {server.address}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.close()


@contextmanager
def server_process(device: str, gib: float, chunk_mib: int, logs: Path) -> Iterator[str]:
    argv = [sys.executable, __file__, "serve", "--device", device, "--gib", str(gib)]
    argv += ["--chunk-mib", str(chunk_mib)]
    proc = ServerProcess(argv, log=logs / f"server-{device}.log", ready=READY, timeout=120)
    try:
        yield proc.address
    finally:
        proc.stop(timeout=30)


# ---- measurements -----------------------------------------------------------------------


def device_seconds(fn: Callable[[], object], repeat: int) -> list[float]:
    """Wall seconds of `fn` on the current CUDA stream (CUDA events), after one warm-up."""
    fn()
    out = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out


def rate(nbytes: int, seconds: list[float]) -> dict[str, Any]:
    best, median = min(seconds), statistics.median(seconds)
    return {
        "gbps": round(nbytes / median / 1e9, 2),
        "best_gbps": round(nbytes / best / 1e9, 2),
        "bytes": nbytes,
        "seconds": [round(s, 6) for s in seconds],
    }


def copy_rates(repeat: int) -> dict[str, Any]:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    d2d = rate(n, device_seconds(lambda: dst.copy_(src), repeat))
    host = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    h2d = rate(host.numel(), device_seconds(lambda: target.copy_(host, non_blocking=True), repeat))
    return {"d2d_copy": d2d, "h2d_pinned": h2d}


def digest_rates(repeat: int) -> dict[str, Any]:
    data = torch.empty(256 << 20, dtype=torch.uint8, device="cuda").random_(0, 256)
    out = {}
    for name, sums in (("eager", dd.lane_sums), ("compiled", dd.fused())):
        started = time.perf_counter()
        digest = dd.device_digest(data, sums)  # warm-up (compiles)
        first = time.perf_counter() - started
        out[f"device_digest_{name}"] = rate(
            data.numel(), device_seconds(lambda s=sums: dd.digest_sums(data, s), repeat)
        ) | {"first_call_seconds": round(first, 3), "digest": digest}
    eager, compiled = out["device_digest_eager"], out["device_digest_compiled"]
    out["device_digest_compiled"]["same_as_eager"] = eager["digest"] == compiled["digest"]
    return out


def pull(
    address: str, manifest: Manifest, device: str, transport: str, repeat: int
) -> dict[str, Any]:
    dest = {
        t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device=device)
        for t in manifest.tensors
    }
    client = netloader.Client([address], secret=SECRET.encode(), transport=transport)
    seconds, used = [], set()
    for _ in range(repeat):
        started = time.perf_counter()
        report = client.load_into(dest, netloader.Identity("bench"))
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        used.add(report.transport)
    return rate(manifest.total_bytes, seconds) | {"transport": "+".join(sorted(used))}


def pulls(
    gib: float,
    chunk_mib: int,
    repeat: int,
    logs: Path,
    out: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """Add the pulls' figures to `out`, calling `save` after each server's."""
    with server_process("cpu", gib, chunk_mib, logs) as address:
        manifest = netloader.Client([address], secret=SECRET.encode()).manifest()
        progress(f"tcp from a host server: {manifest.total_bytes} bytes")
        out["tcp_into_host"] = pull(address, manifest, "cpu", "tcp", repeat)
        out["tcp_into_cuda"] = pull(address, manifest, "cuda", "tcp", repeat)
    save()
    with server_process("cuda", gib, chunk_mib, logs) as address:
        manifest = netloader.Client([address], secret=SECRET.encode()).manifest()
        progress("from a CUDA server: tcp, cuda-ipc (eager, compiled, default digest)")
        out["tcp_cuda_server_into_cuda"] = pull(address, manifest, "cuda", "tcp", repeat)
        for form in ("eager", "compiled", "auto"):  # auto: what a pull uses by default
            os.environ[cuda_ipc.DIGEST_ENV] = form
            try:
                out[IPC_ROWS[form]] = pull(address, manifest, "cuda", "cuda-ipc", repeat)
            finally:
                del os.environ[cuda_ipc.DIGEST_ENV]
    save()


def targets(figures: dict[str, Any]) -> dict[str, Any]:
    """Each target's value and whether it was met (of those whose figures exist)."""

    def gbps(key: str) -> float:
        return float(figures[key]["gbps"]) if key in figures else float("nan")

    def best(*keys: str) -> float:
        return max((gbps(k) for k in keys if k in figures), default=float("nan"))

    ipc = best(*IPC_ROWS.values())
    digest = best("device_digest_eager", "device_digest_compiled")
    checks = {
        "cuda_ipc_verified_vs_d2d": (ipc / gbps("d2d_copy"), 0.5),
        "tcp_into_cuda_vs_host": (gbps("tcp_into_cuda") / gbps("tcp_into_host"), 0.9),
        "device_digest_gbps": (digest, 1000.0),
    }
    return {
        k: {"value": round(v, 3), "target": t, "met": v >= t}
        for k, (v, t) in checks.items()
        if v == v  # not NaN: its figures were measured
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="bench", choices=["bench", "serve"])
    parser.add_argument("--device", default="cuda", help="(serve) where the tensors are")
    parser.add_argument("--gib", type=float, default=2.0, help="size of the served model")
    parser.add_argument("--chunk-mib", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=Path("runs/bench_gpu.json"))
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args.device, args.gib, args.chunk_mib)
        return
    if not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device (torch.cuda.is_available() is false)")
    logs = args.json.parent
    logs.mkdir(parents=True, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    figures: dict[str, Any] = {}
    result = {
        "machine": {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / (1 << 30), 1),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpus": os.cpu_count(),
        },
        "settings": {"gib": args.gib, "chunk_mib": args.chunk_mib, "repeat": args.repeat},
        "figures": figures,
        "complete": False,
    }

    def save() -> None:  # after each step: a run cut short still leaves its figures
        result["targets"] = targets(figures)
        args.json.write_text(json.dumps(result, indent=2) + "\n")

    progress("copies")
    figures |= copy_rates(args.repeat)
    progress("device digest")
    figures |= digest_rates(args.repeat)
    save()
    pulls(args.gib, args.chunk_mib, args.repeat, logs, figures, save)
    result["complete"] = True
    save()
    print(json.dumps({k: v["gbps"] for k, v in figures.items()}, indent=2))
    print(json.dumps(result["targets"], indent=2))


if __name__ == "__main__":
    main()
