#!/usr/bin/env python3
"""vLLM (CPU) with netloader vs vLLM's default loader, on the ~1 GB Llama (bfloat16).

    .venv/bin/python benchmarks/bench_vllm.py [--repeat 2] [--latency-seconds 20]
                                              [--latency-only] [--json out.json]

Starts a seed instance (`--load-format netloader`, loads from disk and serves), then:

1. starts new instances, one at a time, each way: `netloader` from a directory without
   weight files, loading from the seed; and `auto` (vLLM's default loader) from the
   checkpoint on disk; with the page cache warm, and cold (`sync; echo 3 >
   /proc/sys/vm/drop_caches` before the start, when that file is writable). For each:
   the weight-loading time (vLLM's "Loading weights took X seconds" for the default
   loader, netloader's "loaded ... in X s" summary line for netloader) and start-to-ready
   (process start until /health answers);
2. for each of SEEDS (the seed's sending settings; a fresh seed each), times sequential
   greedy completions on the seed while it is idle, and while a separate process pulls
   the whole model from the seed's netloader port over and over
   (netloader.Client(...).load_into(...) into reused buffers) for the same duration, over
   tcp or same-host, the pulling process at nice 0 or 19 (LATENCY_RUNS).

Prints Markdown tables; --json writes every measurement. Uses scripts/setup_vllm.sh and
scripts/make_tiny_llama.py (models cached in runs/models/). Run it on an otherwise idle
machine: the numbers are wall-clock times on shared cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, drop_page_cache, vllm_and_llama
from netloader.testing.processes import ChildProcess, read_address_file
from netloader.testing.vllm import PROMPTS, VllmInstance, make_weightless_dir

MODEL_NAME = "llama1g"
VLLM_WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")
NETLOADER_LOADED = re.compile(
    r"netloader: loaded \d+ tensors, (\d+) bytes in ([\d.]+) s .* over (\S+),"
)
# How a new instance loads: netloader's config beyond SOURCE, or "disk" (vLLM's default).
HOWS: dict[str, dict[str, Any]] = {"netloader": {}, "netloader-tcp": {"TRANSPORT": "tcp"}}
LABELS = {
    "netloader": "netloader, from the seed (auto: same-host here)",
    "netloader-tcp": "netloader, from the seed, TRANSPORT=tcp",
    "disk": "vLLM default, disk",
}
# The seed's sending settings the latency rows compare (each a fresh seed).
SEEDS: dict[str, dict[str, Any]] = {
    "defaults (sender threads at nice 10, no rate cap)": {},
    "sender threads at nice 0, no rate cap (before)": {"SENDER_NICE": 0},
    "SEND_RATE 250 MB/s": {"SEND_RATE": 250e6},
}
# (seed, transport of the pulling client, the client runs at nice 19): the latency rows.
# A client at nice 19 stands in for one on another host: it takes only CPU the seed leaves.
LATENCY_RUNS: list[tuple[str, str, bool]] = [
    ("sender threads at nice 0, no rate cap (before)", "tcp", False),
    ("defaults (sender threads at nice 10, no rate cap)", "tcp", False),
    ("defaults (sender threads at nice 10, no rate cap)", "tcp", True),
    ("SEND_RATE 250 MB/s", "tcp", True),
    ("SEND_RATE 250 MB/s", "tcp", False),
    ("defaults (sender threads at nice 10, no rate cap)", "same-host", False),
]
NETLOADER_FALLBACK = "loads from disk with the default loader"


def warm_page_cache(model_dir: Path) -> None:
    for f in model_dir.glob("*.safetensors"):
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def start_instance(
    python: str, how: str, model: Path, weightless: Path, seed_addr: str, logs: Path, name: str
) -> dict[str, Any]:
    """Start one instance `how` (a key of HOWS), wait for ready, read its log, stop."""
    if how != "disk":
        config: dict[str, Any] | None = {
            "MODEL": MODEL_NAME,
            "SOURCE": [{"device_id": 0, "sources": [seed_addr]}],
            **HOWS[how],
        }
        instance = VllmInstance(
            python, weightless, config, workdir=logs, name=name, ready_timeout=300
        )
    else:
        instance = VllmInstance(
            python, model, None, workdir=logs, name=name, load_format="auto", ready_timeout=300
        )
    with instance:
        text = instance.complete("The cat", max_tokens=4)  # it answers
        log = instance.log_text()
        ready = instance.ready_seconds
    row: dict[str, Any] = {"ready_s": ready, "first_completion": text}
    if how != "disk":
        if NETLOADER_FALLBACK in log:
            raise RuntimeError(f"{name} fell back to disk; see {instance.log_path}")
        m = NETLOADER_LOADED.search(log)
        assert m, f"no netloader summary in {instance.log_path}"
        row.update(weights_s=float(m.group(2)), bytes=int(m.group(1)), over=m.group(3))
        row["gbps"] = row["bytes"] / row["weights_s"] / 1e9
    else:
        m = VLLM_WEIGHTS.search(log)
        assert m, f"no 'Loading weights took' in {instance.log_path}"
        row["weights_s"] = float(m.group(1))
    return row


def time_completions(seed: VllmInstance, seconds: float, max_tokens: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t = time.perf_counter()
        seed.complete(PROMPTS[len(latencies) % len(PROMPTS)], max_tokens=max_tokens)
        latencies.append(time.perf_counter() - t)
    return latencies


def pull_loop(address: str, seconds: float, out: str, transport: str) -> None:
    """(In a child process.) Pull the whole model from `address` over `transport` again and
    again into the same buffers for `seconds`; write the count, bytes and times as JSON to
    `out`."""
    import torch

    import netloader

    client = netloader.Client([address], transport=transport)
    manifest = client.manifest()
    dest = {t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype)) for t in manifest.tensors}
    print("ready", flush=True)
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        times.append(client.load_into(dest, manifest.identity).seconds)
    Path(out).write_text(json.dumps({"pulls": len(times), "bytes": manifest.total_bytes,
                                     "seconds": times}))  # fmt: skip


def latency_under_load(seed: VllmInstance, address: str, seconds: float, max_tokens: int,
                       logs: Path, transport: str,
                       client_nice: bool) -> dict[str, Any]:  # fmt: skip
    out = logs / f"pull_loop_{time.monotonic_ns()}.json"
    nice = ["nice", "-n", "19"] if client_nice else []
    child = ChildProcess(
        [*nice, sys.executable, __file__, "--pull-loop", address, "--pull-transport", transport,
         "--latency-seconds", str(seconds), "--json", str(out)],
    )  # fmt: skip
    try:
        child.expect(r"^ready$")
        latencies = time_completions(seed, seconds, max_tokens)
        child.proc.wait(timeout=seconds + 120)
    finally:
        if child.proc.poll() is None:
            child.kill()
    pulls = json.loads(out.read_text())
    pulled = pulls["bytes"] * pulls["pulls"]
    return {"latencies_s": latencies, "pulls": pulls["pulls"], "pull_seconds": pulls["seconds"],
            "pulled_bytes": pulled, "pull_gbps": pulled / sum(pulls["seconds"]) / 1e9}  # fmt: skip


def load_rows(results: dict[str, Any], args: argparse.Namespace, python: str, model: Path,
              weightless: Path, address: str, logs: Path, cold: bool,
              seed: VllmInstance) -> None:  # fmt: skip
    """Start new instances one at a time, each way, warm and cold page cache."""
    expected = seed.complete("The cat", max_tokens=4)
    for rep in range(args.repeat):
        for cache in ("warm", "cold") if cold else ("warm",):
            hows = [*HOWS, "disk"]
            for how in hows if rep % 2 == 0 else hows[::-1]:
                if cache == "warm":
                    warm_page_cache(model)
                elif (why := drop_page_cache()) is not None:
                    sys.exit(f"bench_vllm: cannot drop the page cache: {why}")
                name = f"{how}-{cache}-{rep}"
                row = start_instance(python, how, model, weightless, address, logs, name)
                row.update(how=how, cache=cache, rep=rep)
                row["same_output_as_seed"] = row["first_completion"] == expected
                print(f"bench_vllm: {name}: {row}", file=sys.stderr)
                results["loads"].append(row)


def summary(values: list[float]) -> dict[str, float]:
    p90 = (
        statistics.quantiles(values, n=10, method="inclusive")[8] if len(values) > 1 else values[0]
    )
    return {"n": len(values), "median": statistics.median(values), "p90": p90}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=2, help="starts per configuration")
    ap.add_argument("--latency-seconds", type=float, default=20.0)
    ap.add_argument("--max-tokens", type=int, default=8, help="per timed completion")
    ap.add_argument("--no-cold", action="store_true", help="skip the dropped-page-cache runs")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--latency-only", action="store_true", help="skip the instance starts")
    ap.add_argument("--pull-loop", metavar="ADDR", help=argparse.SUPPRESS)
    ap.add_argument("--pull-transport", default="tcp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pull_loop:
        pull_loop(args.pull_loop, args.latency_seconds, str(args.json), args.pull_transport)
        return 0

    python, model = vllm_and_llama("1g")
    logs = Path(tempfile.mkdtemp(prefix="bench-vllm-", dir=REPO / "runs"))
    weightless = make_weightless_dir(model, logs / "weightless")
    size = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    cold = not args.no_cold and os.access("/proc/sys/vm/drop_caches", os.W_OK)
    print(f"bench_vllm: model {model} ({size / 1e9:.2f} GB), logs in {logs}, "
          f"cold runs {'on' if cold else 'off'}", file=sys.stderr)  # fmt: skip

    results: dict[str, Any] = {
        "model": str(model), "checkpoint_bytes": size, "dtype": "bfloat16",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "loads": [], "latency": {},
    }  # fmt: skip
    for seed_name, seed_settings in SEEDS.items():
        prefix = logs / f"seed{len(results['latency'])}_"
        seed_config = {"MODEL": MODEL_NAME, "OUTPUT_PREFIX": str(prefix), **seed_settings}
        with VllmInstance(python, model, seed_config, workdir=logs, name=prefix.name + "seed",
                          ready_timeout=300) as seed:  # fmt: skip
            address = read_address_file(Path(f"{prefix}0.txt"))
            if not results["loads"] and not args.latency_only:
                results["seed_ready_s"] = seed.ready_seconds
                load_rows(results, args, python, model, weightless, address, logs, cold, seed)
            seed.complete("The cat", max_tokens=args.max_tokens)  # warm the request path
            runs: dict[str, Any] = {
                "idle_s": time_completions(seed, args.latency_seconds, args.max_tokens)
            }
            for name, transport, client_nice in LATENCY_RUNS:
                if name == seed_name:
                    runs[f"{transport}, client at nice {19 if client_nice else 0}"] = (
                        latency_under_load(seed, address, args.latency_seconds,
                                           args.max_tokens, logs, transport, client_nice)
                    )  # fmt: skip
            results["latency"][seed_name] = runs
            print(f"bench_vllm: latency, {seed_name}: {runs}", file=sys.stderr)
    results["max_tokens"] = args.max_tokens

    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def markdown(results: dict[str, Any]) -> str:
    lines: list[str] = []
    if results["loads"]:
        lines += [
            f"Model: Llama, 502M parameters, {results['checkpoint_bytes'] / 1e9:.2f} GB "
            f"bfloat16, {results['machine']['cpus']} CPU cores; median of {{n}} starts each.",
            "",
            "| how the new instance loads | page cache | weights loaded in (s) "
            "| start to ready (s) | output = seed's |",
            "| --- | --- | --- | --- | --- |",
        ]
    n = 0
    for how, label in LABELS.items():
        for cache in ("warm", "cold"):
            rows = [r for r in results["loads"] if r["how"] == how and r["cache"] == cache]
            if not rows:
                continue
            n = len(rows)
            weights = statistics.median(r["weights_s"] for r in rows)
            ready = statistics.median(r["ready_s"] for r in rows)
            extra = ""
            if how != "disk":
                over = "/".join(sorted({r["over"] for r in rows}))
                extra = f" ({statistics.median(r['gbps'] for r in rows):.2f} GB/s, over {over})"
            same = "yes" if all(r["same_output_as_seed"] for r in rows) else "NO"
            lines.append(f"| {label} | {cache} | {weights:.2f}{extra} | {ready:.1f} | {same} |")
    if lines:
        lines[0] = lines[0].replace("{n}", str(n))
        lines.append("")
    lines += [
        f"Seed request latency, sequential greedy completions of {results['max_tokens']} "
        "tokens, while a separate process pulls the whole model from the seed again and again:",
        "",
        "| seed's sending settings | pulling client | requests | median (s) | p90 (s) "
        "| median vs idle | one full pull took (median s) | pull GB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for seed_name, runs in results["latency"].items():
        idle = summary(runs["idle_s"])
        lines.append(
            f"| {seed_name} | none (idle) | {idle['n']} | {idle['median']:.3f} "
            f"| {idle['p90']:.3f} | 1.00x | | |"
        )
        for client, run in runs.items():
            if client == "idle_s":
                continue
            busy = summary(run["latencies_s"])
            lines.append(
                f"| {seed_name} | {client} | {busy['n']} | {busy['median']:.3f} "
                f"| {busy['p90']:.3f} | {busy['median'] / idle['median']:.2f}x "
                f"| {statistics.median(run['pull_seconds']):.2f} | {run['pull_gbps']:.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
