"""Scale-out on an emulated cluster (network namespaces with rate-limited links, see
netloader.testing.cluster): waves of N clients from one seed by unicast, chain and tree;
one client striping over 1 vs 4 seeds; a seed killed mid-transfer; and the seed's memory
with 1 and 16 concurrent clients (scenarios: netloader.testing.cluster_scenarios). Needs
root.

    .venv/bin/python benchmarks/bench_cluster.py --json runs/bench_cluster.json \
        --plot docs/scaleout.png
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from netloader.testing.cluster import Cluster, Link
from netloader.testing.cluster_scenarios import seed_memory, striping, wave


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
