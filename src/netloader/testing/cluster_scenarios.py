"""Scale-out scenarios on an emulated cluster (`netloader.testing.cluster`), each host's
part played by a `netloader.testing.cluster_worker` process: a wave of clients from one
seed, one client striping over several seeds (one of them killed, if asked), and a
seed's memory while it serves concurrent clients. Shared by benchmarks/bench_cluster.py
(which reports the times) and tests/test_cluster.py (which checks what happened).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netloader.testing.cluster import Cluster
from netloader.testing.processes import ChildProcess, process_usage

WORKER = [sys.executable, "-m", "netloader.testing.cluster_worker"]
SEED_PORT = 7000


def start_worker(cluster: Cluster, host: int, *args: str) -> ChildProcess:
    """A worker inside `host`, on that host's address; its stderr is inherited."""
    return ChildProcess(
        [*WORKER, *args, "--ip", cluster.address(host)],
        popen=functools.partial(cluster.popen, host),
    )


def wave(
    cluster: Cluster, clients: int, fanout: int, size_mib: int, chunk_kib: int
) -> dict[str, Any]:
    """Seed on host 0, clients on hosts 1..N, all starting at one instant. Every client
    must have received a bit-identical model."""
    with tempfile.TemporaryDirectory() as tmp:
        wave_dir, start_file = Path(tmp) / "wave", Path(tmp) / "start"
        wave_dir.mkdir()
        common = ["--size-mib", str(size_mib), "--chunk-kib", str(chunk_kib)]
        seed_args = ["seed", "--port", str(SEED_PORT), "--wave", str(wave_dir), *common]
        procs = [start_worker(cluster, 0, *seed_args)]
        try:
            procs[0].json_line()
            for i in range(clients):
                procs.append(
                    start_worker(
                        cluster,
                        1 + i,
                        "client",
                        "--wave",
                        str(wave_dir),
                        "--fanout",
                        str(fanout),
                        "--start-file",
                        str(start_file),
                        *common,
                    )
                )
                procs[-1].json_line()  # joined: positions follow host order
            began = time.time()
            start_file.touch()
            results = [p.json_line() for p in procs[1:]]
        finally:
            for p in procs:
                p.stop(timeout=10)
    assert all(r["identical"] for r in results), results
    return {
        "clients": clients,
        "fanout": fanout,
        "seconds": max(r["end"] for r in results) - began,
        "per_client": sorted(r["end"] - began for r in results),
        "sources": [r["sources"] for r in sorted(results, key=lambda r: r["position"])],
    }


def striping(
    cluster: Cluster, seeds: int, size_mib: int, chunk_kib: int, kill_after: float | None = None
) -> dict[str, Any]:
    """Seeds on hosts 0..seeds-1, one client on the last host pulling from all of them;
    with `kill_after`, the second seed is killed that many seconds into the pull."""
    client_host = len(cluster.links) - 1
    with tempfile.TemporaryDirectory() as tmp:
        start_file = Path(tmp) / "start"
        common = ["--size-mib", str(size_mib), "--chunk-kib", str(chunk_kib)]
        procs = [
            start_worker(cluster, h, "seed", "--port", str(SEED_PORT), *common)
            for h in range(seeds)
        ]
        try:
            for p in procs:
                p.json_line()
            sources = ",".join(f"{cluster.address(h)}:{SEED_PORT}" for h in range(seeds))
            puller = start_worker(
                cluster,
                client_host,
                "client",
                "--sources",
                sources,
                "--start-file",
                str(start_file),
                *common,
            )
            procs.append(puller)
            puller.json_line()
            began = time.time()
            start_file.touch()
            if kill_after is not None:
                time.sleep(kill_after)
                procs[1].proc.kill()
            result = puller.json_line()
        finally:
            for p in procs:
                p.stop(timeout=10)
    return {
        "seeds": seeds,
        "seconds": result["end"] - began,
        "identical": result["identical"],
        "bytes_by_source": result["bytes_by_source"],
        "failures": result["failures"],
    }


def seed_memory(size_mib: int, clients: list[int]) -> dict[int, dict[str, int]]:
    """The seed's resident memory (kB), threads and file descriptors, idle (key 0) and
    after serving k concurrent clients (key k), on loopback."""
    seed = ChildProcess([*WORKER, "seed", "--size-mib", str(size_mib)])
    out: dict[int, dict[str, int]] = {}
    try:
        address = seed.json_line()["ready"]
        out[0] = process_usage(seed.pid)
        for k in clients:
            many = ["many-clients", "--clients", str(k), "--sources", address]
            subprocess.run(
                [*WORKER, *many, "--size-mib", str(size_mib)],
                check=True,
                capture_output=True,
            )
            out[k] = process_usage(seed.pid)
    finally:
        seed.stop(timeout=10)
    return out
