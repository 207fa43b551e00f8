#!/usr/bin/env python3
"""Live updates of a running vLLM fleet against restarting it with the new weights.

    .venv/bin/python benchmarks/bench_update.py [--size tiny|1g] [--instances 2] [--json out.json]

In one run (bfloat16, `--enforce-eager`, each instance tp=1):

1. a fleet of `--instances` vLLM instances loads version 1 from a checkpoint server
   (`netloader serve DIR --version 1`), with live updates on;
2. four updates, each switching the fleet with `netloader update`, one instance after
   the other, while a client sends requests to the first instance: version 2 changes
   decoder layer 1 and version 3 every weight, each instance pulling from the publisher;
   versions 4 (layer 1) and 5 (every weight) likewise, but chained (`URL=HOST:PORT`):
   each instance after the first pulls from the one that switched before it;
3. for comparison, what a restart costs: a new instance started from version 5 on disk
   (vLLM's default loader), and one loading it from the checkpoint server of version 5.

Reported: the fleet's update time, per instance, the bytes each update moved (the
instances' own log lines) and how many the publisher sent, request latency before and
during the update, and the two restarts' start-to-ready. Every instance is checked to
answer as the fresh version-5 instance does after the last update. Run it on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, progress, serve_checkpoint, vllm_and_llama, write_json
from netloader.cli.update import update_fleet
from netloader.testing.models import perturbed_checkpoint
from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import PROMPTS, VllmInstance, running

STAGED = re.compile(
    r"staged version (\S+): (\d+) of (\d+) checkpoint tensors, (\d+) of (\d+) bytes"
)
UPDATES = ("--weight-transfer-config", '{"backend": "netloader"}')
PHASES = (  # label, version, chained
    ("one layer", "2", False),
    ("every weight", "3", False),
    ("one layer, chained", "4", True),
    ("every weight, chained", "5", True),
)
SERVES = re.compile(r"netloader: rank 0 serves \d+ tensors \(\d+ bytes\) on (\S+);")
SENT = re.compile(r"netloader: sent \d+ chunks, (\d+) bytes to ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "1g"), default="tiny")
    ap.add_argument("--instances", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    python, v1 = vllm_and_llama(args.size)
    work = Path(tempfile.mkdtemp(prefix="bench-update-", dir=REPO / "runs"))
    progress(f"bench_update: model {v1}, logs in {work}")
    versions = {"1": v1}
    for version, touched in ((2, "layers.1."), (3, ""), (4, "layers.1."), (5, "")):
        versions[str(version)] = perturbed_checkpoint(
            versions[str(version - 1)], work / f"v{version}" / v1.name, touched, seed=version
        )

    # Chunks small enough that few straddle two decoder layers of the tiny model (a
    # changed chunk's layers are pulled whole).
    chunks = ("--chunk-kib", "64" if args.size == "tiny" else "16384")

    def publish(directory: Path, version: str) -> ServerProcess:
        return serve_checkpoint(directory, work / f"serve-v{version}.log",
                                ("--model", "m", "--version", version, *chunks),
                                verbose=True)  # fmt: skip

    def instance(name: str, model: Path, config: dict[str, Any] | None, **kw: Any) -> VllmInstance:
        return VllmInstance(python, model, config, workdir=work, name=name,
                            served_model_name="m", ready_timeout=600, **kw)  # fmt: skip

    rows: dict[str, Any] = {"model": str(v1), "instances": args.instances}
    servers = {version: publish(directory, version) for version, directory in versions.items()}
    try:
        source = [{"device_id": 0, "sources": [servers["1"].address]}]
        fleet = [
            instance(f"live{i}", v1, {"MODEL": "m", "SOURCE": source},
                     env={"VLLM_SERVER_DEV_MODE": "1"}, extra_args=UPDATES)
            for i in range(args.instances)
        ]  # fmt: skip
        with running(*fleet):
            probe = PROMPTS[0]
            idle = [_latency(fleet[0], probe) for _ in range(5)]
            for label, version, chained in PHASES:
                latencies: list[float] = []
                stop = threading.Event()

                def ask(stop: threading.Event = stop, out: list[float] = latencies) -> None:
                    while not stop.is_set():
                        out.append(_latency(fleet[0], probe))

                asker = threading.Thread(target=ask, daemon=True)
                asker.start()
                started = time.perf_counter()
                # What `netloader update` does, in this process (the command's own start,
                # importing torch, is not the update's cost).
                chain = [(m.base_url, serve_line(m) if chained else None) for m in fleet]
                outcomes = list(
                    update_fleet(chain, version, [servers[version].address], timeout=600)
                )
                seconds = time.perf_counter() - started
                failures = [o.failure for o in outcomes if o.failure is not None]
                if failures:
                    raise SystemExit(f"bench_update: an update failed: {failures}")
                per = [o.seconds for o in outcomes]
                stop.set()
                asker.join(timeout=120)
                moved = [_moved(member, version) for member in fleet]
                rows[label] = {"fleet_s": seconds, "per_instance_s": per, "bytes": moved,
                               "publisher_sent": _sent(work / f"serve-v{version}.log"),
                               "latency_during_s": _summary(latencies)}  # fmt: skip
                progress(f"bench_update: {label}: {rows[label]}")
            rows["latency_idle_s"] = _summary(idle)
            answers = [member.completions() for member in fleet]
        with instance("disk_v5", versions["5"], None, load_format="auto") as fresh:
            rows["restart from disk"] = fresh.ready_seconds
            reference = fresh.completions()
        seed = [{"device_id": 0, "sources": [servers["5"].address]}]
        with instance("seed_v5", versions["5"], {"MODEL": "m", "SOURCE": seed}) as fresh:
            rows["restart from a seed"] = fresh.ready_seconds
    finally:
        for server in servers.values():
            server.stop()
    rows["same_outputs"] = all(a == reference for a in answers)
    _print(rows, v1)
    if args.json:
        write_json(args.json, rows)
    return 0 if rows["same_outputs"] else 1


def _latency(instance: VllmInstance, prompt: str) -> float:
    started = time.perf_counter()
    instance.complete(prompt, max_tokens=8)
    return time.perf_counter() - started


def serve_line(instance: VllmInstance) -> str:
    """The address of the instance's netloader server (rank 0)."""
    found = [m.group(1) for line in instance.netloader_lines() if (m := SERVES.search(line))]
    return found[-1]


def _sent(log: Path) -> int:
    """The bytes a `netloader serve` process logged it sent."""
    return sum(int(m.group(1)) for m in SENT.finditer(log.read_text(errors="replace")))


def _moved(instance: VllmInstance, version: str) -> int:
    found = [m for line in instance.netloader_lines() if (m := STAGED.search(line))]
    return sum(int(m.group(4)) for m in found if m.group(1) == version)


def _summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {}
    return {"n": len(samples), "median": statistics.median(samples), "max": max(samples)}


def _print(rows: dict[str, Any], model: Path) -> None:
    print(f"\nModel {model.name}, {rows['instances']} instances (tp=1, bfloat16, eager), "
          f"{os.cpu_count()} CPUs ({platform.machine()}).\n")  # fmt: skip
    print("| | fleet update | per instance | bytes moved per instance | publisher sent | "
          "request latency during (median / max) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    idle = rows["latency_idle_s"]
    for label, _, _ in PHASES:
        r = rows[label]
        per = ", ".join(f"{s:.2f} s" for s in r["per_instance_s"])
        during = r["latency_during_s"]
        cells = [label, f"{r['fleet_s']:.2f} s", per, ", ".join(map(str, r["bytes"])),
                 str(r["publisher_sent"]),
                 f"{during.get('median', 0):.3f} / {during.get('max', 0):.3f} s"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\nRequest latency idle (8 tokens): median {idle['median']:.3f} s, max "
          f"{idle['max']:.3f} s. A restart instead, per instance: from disk "
          f"{rows['restart from disk']:.1f} s, from a seed {rows['restart from a seed']:.1f} s "
          "(start to ready). After the updates every instance answers as a fresh instance of "
          f"the last version: {'yes' if rows['same_outputs'] else 'NO'}.")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
