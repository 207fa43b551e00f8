"""One host's process in bench_cluster.py: a seed that serves a deterministic model, or a
client that joins a wave, waits for the common start signal, pulls (relaying what it
receives), prints its timings as JSON and keeps serving until SIGTERM."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import netloader
from netloader.wave import Wave

MODEL = "bench-model"
TENSOR_MIB = 4


def model(size_mib: int) -> dict[str, torch.Tensor]:
    """`size_mib` of deterministic fp16 tensors, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    count = max(1, size_mib // TENSOR_MIB)
    return {
        f"layers.{i}.weight": torch.randint(
            0, 256, (TENSOR_MIB << 20,), dtype=torch.uint8, generator=g
        )
        .view(torch.float16)
        .reshape(1024, -1)
        for i in range(count)
    }


def empty_model(size_mib: int) -> dict[str, torch.Tensor]:
    return {name: torch.empty_like(t) for name, t in model(size_mib).items()}


def wait_for_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


def seed(args: argparse.Namespace) -> None:
    server = netloader.serve(
        model(args.size_mib),
        model_name=MODEL,
        listen=f"{args.ip}:{args.port}",
        chunk_bytes=args.chunk_kib << 10,
        output_file=None if args.wave is None else Path(args.wave) / f"seed-{args.name}-0.txt",
    )
    server.manifest()  # digests ready before anyone is told to start
    print(json.dumps({"ready": str(server.address)}), flush=True)
    wait_for_sigterm()
    server.close()


def client(args: argparse.Namespace) -> None:
    dest = empty_model(args.size_mib)
    relay = netloader.relay(listen=f"{args.ip}:0")
    if args.sources:
        position, sources, stripe = 0, args.sources.split(","), None
    else:
        wave = Wave(Path(args.wave), fanout=args.fanout or None)
        position = wave.join(str(relay.address))
        sources, stripe = wave.sources(position), 1
    print(json.dumps({"ready": str(relay.address), "position": position}), flush=True)
    start = Path(args.start_file)
    while not start.exists():
        time.sleep(0.002)
    report = netloader.load(
        dest, sources, model_name=MODEL, stripe=stripe, relay=relay, stall_timeout=5
    )
    end = time.time()
    expected = model(args.size_mib)
    identical = all(
        torch.equal(dest[n].view(torch.uint8), t.view(torch.uint8)) for n, t in expected.items()
    )
    print(
        json.dumps(
            {
                "position": position,
                "end": end,
                "seconds": report.seconds,
                "sources": list(report.sources),
                "bytes_by_source": dict(report.bytes_by_source),
                "failures": list(report.failures),
                "identical": identical,
            }
        ),
        flush=True,
    )
    wait_for_sigterm()
    relay.close()


def many_clients(args: argparse.Namespace) -> None:
    """`--clients` concurrent pulls from one process (for the seed's memory figure)."""
    dests = [empty_model(args.size_mib) for _ in range(args.clients)]
    reports: list[netloader.LoadReport] = []
    threads = [
        threading.Thread(
            target=lambda d=d: reports.append(
                netloader.load(d, args.sources.split(","), model_name=MODEL)
            )
        )
        for d in dests
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"pulls": len(reports)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["seed", "client", "many-clients"])
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--name", default="a")
    parser.add_argument("--wave")
    parser.add_argument("--fanout", type=int, default=1)
    parser.add_argument("--sources")
    parser.add_argument("--start-file")
    parser.add_argument("--size-mib", type=int, default=96)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--clients", type=int, default=1)
    args = parser.parse_args()
    {"seed": seed, "client": client, "many-clients": many_clients}[args.role](args)


if __name__ == "__main__":
    sys.exit(main())
