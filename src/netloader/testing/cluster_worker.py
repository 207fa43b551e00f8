"""One host's process in a cluster scenario (`cluster_scenarios`): a seed that serves a
deterministic model, or a client that joins a wave, waits for the common start signal,
pulls (relaying what it receives), prints its timings as JSON and keeps serving until
SIGTERM; or many concurrent pulls from one process.

    python -m netloader.testing.cluster_worker seed --size-mib 96 --ip 10.1.2.1 --port 7000
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
from pathlib import Path

import netloader
from netloader.discovery.wave import Wave
from netloader.testing.models import Tensors, blocks, differing, empty_like

MODEL = "bench-model"
TENSOR_MIB = 4


def model(size_mib: int) -> Tensors:
    """`size_mib` of deterministic tensors of 4 MiB each, the same in every process."""
    return blocks(size_mib, count=max(1, size_mib // TENSOR_MIB))


def wait_for_sigterm() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()


def seed(args: argparse.Namespace) -> None:
    server = netloader.serve(
        model(args.size_mib),
        MODEL,
        listen=f"{args.ip}:{args.port}",
        chunk_bytes=args.chunk_kib << 10,
        output_file=None if args.wave is None else Path(args.wave) / f"seed-{args.name}-0.txt",
    )
    server.manifest()  # digests ready before anyone is told to start
    print(json.dumps({"ready": str(server.address)}), flush=True)
    wait_for_sigterm()
    server.close()


def client(args: argparse.Namespace) -> None:
    dest = empty_like(model(args.size_mib))
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
        dest, sources, MODEL, stripe=stripe, relay=relay, timeouts=netloader.Timeouts(stall=5)
    )
    end = time.time()
    identical = not differing(dest, model(args.size_mib))
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
    dests = [empty_like(model(args.size_mib)) for _ in range(args.clients)]
    reports: list[netloader.LoadReport] = []

    def pull(dest: Tensors) -> None:
        reports.append(netloader.load(dest, args.sources.split(","), MODEL))

    threads = [threading.Thread(target=pull, args=(d,)) for d in dests]
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
    main()
