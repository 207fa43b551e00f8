"""Scale-out on an emulated cluster (network namespaces with rate-limited links, see
netloader.testbed): waves of N clients from one seed by unicast, chain and tree; one
client striping over 1 vs 4 seeds; a seed killed mid-transfer; and the seed's memory
with 1 and 16 concurrent clients. Needs root.

    .venv/bin/python benchmarks/bench_cluster.py --json runs/bench_cluster.json \
        --plot docs/scaleout.png
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netloader.testbed import Cluster, Link

WORKER = str(Path(__file__).with_name("cluster_worker.py"))
PYTHON = sys.executable
SEED_PORT = 7000


@dataclass
class Proc:
    popen: subprocess.Popen[str]

    def line(self, timeout: float = 120) -> dict[str, Any]:
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.popen.stdout.readline()
            if not text:
                raise RuntimeError(f"worker exited with {self.popen.wait()}")
            if text.startswith("{"):
                return json.loads(text)  # type: ignore[no-any-return]
        raise TimeoutError("worker said nothing in time")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def start(cluster: Cluster, host: int, *args: str) -> Proc:
    argv = [PYTHON, WORKER, *args, "--ip", cluster.address(host)]
    return Proc(cluster.popen(host, argv, stdout=subprocess.PIPE, text=True))


def wave(
    cluster: Cluster, clients: int, fanout: int, size_mib: int, chunk_kib: int
) -> dict[str, Any]:
    """Seed on host 0, clients on hosts 1..N, all starting at one instant."""
    with tempfile.TemporaryDirectory() as tmp:
        wave_dir, start_file = Path(tmp) / "wave", Path(tmp) / "start"
        wave_dir.mkdir()
        common = ["--size-mib", str(size_mib), "--chunk-kib", str(chunk_kib)]
        seed_args = ["seed", "--port", str(SEED_PORT), "--wave", str(wave_dir), *common]
        procs = [start(cluster, 0, *seed_args)]
        try:
            procs[0].line()
            for i in range(clients):
                procs.append(
                    start(
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
                procs[-1].line()  # joined: positions follow host order
            began = time.time()
            start_file.touch()
            results = [p.line() for p in procs[1:]]
        finally:
            for p in procs:
                p.stop()
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
    """Seeds on hosts 0..seeds-1, one client on the last host pulling from all of them."""
    client_host = len(cluster.links) - 1
    with tempfile.TemporaryDirectory() as tmp:
        start_file = Path(tmp) / "start"
        common = ["--size-mib", str(size_mib), "--chunk-kib", str(chunk_kib)]
        procs = [start(cluster, h, "seed", "--port", str(SEED_PORT), *common) for h in range(seeds)]
        try:
            for p in procs:
                p.line()
            sources = ",".join(f"{cluster.address(h)}:{SEED_PORT}" for h in range(seeds))
            puller = start(
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
            puller.line()
            began = time.time()
            start_file.touch()
            if kill_after is not None:
                time.sleep(kill_after)
                procs[1].popen.kill()
            result = puller.line()
        finally:
            for p in procs:
                p.stop()
    return {
        "seeds": seeds,
        "seconds": result["end"] - began,
        "identical": result["identical"],
        "bytes_by_source": result["bytes_by_source"],
        "failures": result["failures"],
    }


def seed_memory(size_mib: int, clients: list[int]) -> dict[int, dict[str, int]]:
    """The seed's resident memory (kB) after serving k concurrent clients, on loopback."""
    seed = Proc(
        subprocess.Popen(
            [PYTHON, WORKER, "seed", "--size-mib", str(size_mib)], stdout=subprocess.PIPE, text=True
        )
    )
    out: dict[int, dict[str, int]] = {}
    try:
        address = seed.line()["ready"]
        out[0] = _memory(seed.popen.pid)
        for k in clients:
            subprocess.run(
                [
                    PYTHON,
                    WORKER,
                    "many-clients",
                    "--clients",
                    str(k),
                    "--sources",
                    address,
                    "--size-mib",
                    str(size_mib),
                ],
                check=True,
                capture_output=True,
            )
            out[k] = _memory(seed.popen.pid)
    finally:
        seed.stop()
    return out


def _memory(pid: int) -> dict[str, int]:
    fields = {}
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = row.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            fields[key] = int(value.split()[0])
    fields["fds"] = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return fields


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    one = results["waves"]["unicast"][0]["seconds"]
    styles = {"unicast": "o-", "chain": "s-", "tree": "^-"}
    for name, runs in results["waves"].items():
        ax.plot(
            [r["clients"] for r in runs],
            [r["seconds"] for r in runs],
            styles[name],
            label=f"{name} (measured)",
        )
    counts = [r["clients"] for r in results["waves"]["unicast"]]
    ax.plot(counts, [one * n for n in counts], ":", color="grey", label="unicast, N x one")
    ax.plot(counts, [one for _ in counts], "--", color="black", label="ideal (one transfer)")
    ax.set_xlabel("clients starting together from one seed")
    ax.set_ylabel("seconds until the last client is done")
    ax.set_xticks(counts)
    mbit, mib = results["link_mbit"], results["size_mib"]
    ax.set_title(f"{mib} MiB model, {mbit} Mbit/s links (network namespaces)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main() -> None:
    os.environ["NETLOADER_SECRET"] = secrets.token_hex(16)  # every worker authenticates
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link-mbit", type=float, default=200)
    parser.add_argument("--size-mib", type=int, default=96)
    parser.add_argument("--stripe-size-mib", type=int, default=256)
    parser.add_argument("--chunk-kib", type=int, default=1024)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    reason = Cluster.unavailable()
    if reason:
        sys.exit(f"bench_cluster: {reason}")
    counts = [int(c) for c in args.clients.split(",")]
    link = Link(args.link_mbit)
    results: dict[str, Any] = {
        "link_mbit": args.link_mbit,
        "size_mib": args.size_mib,
        "chunk_kib": args.chunk_kib,
        "waves": {"unicast": [], "chain": [], "tree": []},
    }
    with Cluster([link] * (1 + max(counts))) as cluster:
        for name, fanout in (("unicast", 0), ("chain", 1), ("tree", 2)):
            for n in counts:
                run = wave(cluster, n, fanout, args.size_mib, args.chunk_kib)
                results["waves"][name].append(run)
                print(f"{name:8} {n} clients: {run['seconds']:.2f} s", flush=True)
    with Cluster([link] * 4 + [Link(None)]) as cluster:
        results["striping"] = [
            striping(cluster, s, args.stripe_size_mib, args.chunk_kib) for s in (1, 4)
        ]
        for run in results["striping"]:
            print(f"striping from {run['seeds']} seeds: {run['seconds']:.2f} s", flush=True)
        killed = striping(cluster, 4, args.stripe_size_mib, args.chunk_kib, kill_after=1.0)
        results["striping_seed_killed"] = killed
        print(
            f"striping, seed killed after 1 s: {killed['seconds']:.2f} s, "
            f"identical={killed['identical']}, failures={killed['failures']}",
            flush=True,
        )
    results["seed_memory_kb"] = seed_memory(256, [1, 16])
    print(f"seed memory: {results['seed_memory_kb']}", flush=True)
    report(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot(results, args.plot)


def report(results: dict[str, Any]) -> None:
    one = results["waves"]["unicast"][0]["seconds"]
    print("\n| clients | unicast s | chain s | tree (fan-out 2) s | ideal s |")
    print("| --- | --- | --- | --- | --- |")
    for i, run in enumerate(results["waves"]["unicast"]):
        chain, tree = results["waves"]["chain"][i], results["waves"]["tree"][i]
        print(
            f"| {run['clients']} | {run['seconds']:.1f} | {chain['seconds']:.1f} "
            f"({chain['seconds'] / one:.2f}x) | {tree['seconds']:.1f} "
            f"({tree['seconds'] / one:.2f}x) | {one:.1f} |"
        )
    s1, s4 = results["striping"]
    print(
        f"\nstriping: 1 seed {s1['seconds']:.2f} s, 4 seeds {s4['seconds']:.2f} s "
        f"-> {s1['seconds'] / s4['seconds']:.2f}x"
    )
    mem = results["seed_memory_kb"]
    print(
        f"seed RSS kB: idle {mem[0]['VmRSS']}, after 1 client peak {mem[1]['VmHWM']}, "
        f"after 16 concurrent peak {mem[16]['VmHWM']}"
    )


if __name__ == "__main__":
    main()
