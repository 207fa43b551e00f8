#!/usr/bin/env python3
"""Start-to-ready of compiled vLLM instances (vLLM's default torch.compile, no
--enforce-eager): what SHARE_COMPILE_CACHE saves a new instance.

    .venv/bin/python benchmarks/bench_vllm_compiled.py [--size tiny|1g] [--json out.json]

In one run, each instance with a VLLM_CACHE_ROOT of its own (float32, so vLLM's CPU
post-processing runs as in the tests):

1. `eager`: vLLM's default loader with --enforce-eager (no compile at all), for scale;
2. `default loader, cold`: vLLM's default loader, compiled, empty cache;
3. `seed, warm restart`: a netloader seed (weights from disk) on the cache row 2 left,
   with a secret and SHARE_COMPILE_CACHE: what a restart costs with a warm cache;
4. `netloader weights only, cold`: a new instance, weights from the seed, empty cache,
   compiling itself; like every client here, its model directory holds only the config
   and tokenizer files, at another path than the seed's (vLLM's cache key includes it);
5. `netloader weights + compile cache`: the same with SHARE_COMPILE_CACHE, a plain start:
   vLLM's API server takes the seed's cache before it inspects the model;
6. the same after `netloader pull --no-weights --compile-cache ROOT` (the cache, and
   vLLM's model-inspection cache, in place before vLLM starts; the pull's seconds are
   reported and counted in the ratio).

Start-to-ready is process start until /health answers. Prints a Markdown table (with
rows 5 and 6 against row 3, the target being at most 1.15x) and --json writes every
number.
Run it on an otherwise idle machine: these are wall-clock times on shared cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from common import REPO, vllm_and_llama, write_json
from netloader.testing.processes import netloader_command, read_address_file
from netloader.testing.vllm import VllmInstance, make_weightless_dir

SECRET = "the start-to-ready benchmark secret"
TOOK = "took the compile cache"
LOADED = "netloader: loaded"
FALLBACK = "loads from disk with the default loader"
MOVED = "moved the seed's compile cache"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=("tiny", "1g"), default="tiny")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    python, model = vllm_and_llama(args.size)
    logs = Path(tempfile.mkdtemp(prefix="bench-compiled-", dir=REPO / "runs"))
    print(f"bench_vllm_compiled: model {model}, logs in {logs}", file=sys.stderr)

    def start(name: str, directory: Path, config: dict[str, Any] | None, **kw: Any) -> VllmInstance:
        root = logs / f"{name}-cache"
        env = {"VLLM_CACHE_ROOT": str(kw.pop("root", root)), **kw.pop("env", {})}
        return VllmInstance(python, directory, config, workdir=logs, name=name, dtype="float32",
                            env=env, ready_timeout=600, **kw)  # fmt: skip

    rows: list[dict[str, Any]] = []
    outputs: dict[str, dict[str, str]] = {}

    def record(label: str, instance: VllmInstance, root: Path, since: float) -> None:
        """`since`: wall-clock time before the instance started (kernels newer than it and
        than any cache it took are kernels it built)."""
        outputs[label] = instance.completions()
        lines = instance.netloader_lines()
        took = [ln for ln in lines if TOOK in ln]
        from_peer = any(LOADED in ln for ln in lines) and not any(FALLBACK in ln for ln in lines)
        if took:
            stamp = took[0].split(" [netloader]")[0][-23:]
            taken = datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            since = max(since, taken + 1)
        built = sum(p.stat().st_mtime > since for p in root.rglob("inductor_cache/**/*.so"))
        rows.append({"row": label, "ready_s": instance.ready_seconds, "took_cache": bool(took),
                     "weights_from_seed": from_peer, "kernels_built": built,
                     "moved_to_own_key": any(MOVED in ln for ln in lines)})  # fmt: skip
        print(f"bench_vllm_compiled: {rows[-1]}", file=sys.stderr)

    def root_of(name: str) -> Path:
        return logs / f"{name}-cache"

    now = time.time()
    with start("eager", model, None, load_format="auto") as eager:
        record("vLLM default loader, --enforce-eager (no compile)", eager, root_of("eager"), now)
    cold_root = logs / "cold-cache"
    now = time.time()
    with start(
        "cold", model, None, load_format="auto", enforce_eager=False, root=cold_root
    ) as cold:
        record("vLLM default loader, compiled, empty cache", cold, cold_root, now)
    secret = {"NETLOADER_SECRET": SECRET}
    seed_config = {"MODEL": "m", "OUTPUT_PREFIX": str(logs / "seed_"), "SHARE_COMPILE_CACHE": True}
    now = time.time()
    with start("seed", model, seed_config, enforce_eager=False, root=cold_root, env=secret) as seed:
        label = "seed (netloader, weights from disk), restarted on its warm cache"
        record(label, seed, cold_root, now)
        source = [{"device_id": 0, "sources": [read_address_file(logs / "seed_0.txt")]}]
        plain = {"MODEL": "m", "SOURCE": source}
        # Clients: config and tokenizer only, at another path than the seed's model.
        elsewhere = make_weightless_dir(model, logs / "client-model" / model.name)
        now = time.time()
        with start("weights", elsewhere, plain, enforce_eager=False, env=secret) as client:
            label = "netloader weights only, compiled, empty cache"
            record(label, client, root_of("weights"), now)
        shared = {**plain, "SHARE_COMPILE_CACHE": True}
        now = time.time()
        with start("shared", elsewhere, shared, enforce_eager=False, env=secret) as client:
            label = "netloader weights + compile cache, empty cache"
            record(label, client, root_of("shared"), now)
        # A node that runs `netloader pull --compile-cache` before it starts vLLM.
        pre_root = logs / "pulled-cache"
        started = time.perf_counter()
        subprocess.run(
            [netloader_command(), "pull", source[0]["sources"][0], "--no-weights",
             "--out", str(logs / "pulled-files"), "--compile-cache", str(pre_root)],
            check=True, env={**os.environ, **secret}, capture_output=True,
        )  # fmt: skip
        pulled_s = time.perf_counter() - started
        now = time.time()
        kw: dict[str, Any] = {"enforce_eager": False, "env": secret, "root": pre_root}
        with start("pulled", elsewhere, shared, **kw) as client:
            label = "`netloader pull --compile-cache` first, then weights from the seed"
            record(label, client, pre_root, now)
        rows[-1]["pull_s"] = pulled_s
        rows[-1]["took_cache"] = True  # before the start; the instance kept what it found

    reference = outputs[rows[0]["row"]]
    for row in rows:
        row["same_outputs"] = outputs[row["row"]] == reference
    warm = rows[2]["ready_s"]
    ratio = rows[4]["ready_s"] / warm
    ratio_pulled = (rows[5]["ready_s"] + rows[5]["pull_s"]) / warm
    print(f"\nModel {model.name}, float32, {os.cpu_count()} CPUs ({platform.machine()}); "
          "start-to-ready = process start until /health answers.\n")  # fmt: skip
    print("| instance | start-to-ready | weights from the seed | compile cache taken "
          "| kernels built | same outputs |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- |")
    yes = {True: "yes", False: ""}
    for row in rows:
        cells = [row["row"], f"{row['ready_s']:.1f} s", yes[row["weights_from_seed"]],
                 yes[row["took_cache"]], str(row["kernels_built"]),
                 "yes" if row["same_outputs"] else "NO"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")
    print(f"\nweights + compile cache / seed warm restart: {ratio:.2f}x; with the cache pulled "
          f"first ({rows[5]['pull_s']:.1f} s, counted): {ratio_pulled:.2f}x "
          "(target <= 1.15x)")  # fmt: skip
    if args.json:
        write_json(args.json, {"model": str(model), "rows": rows, "ratio_to_warm_restart": ratio,
                               "ratio_pulled_first": ratio_pulled})  # fmt: skip
    clients_ok = all(r["weights_from_seed"] for r in rows[3:]) and rows[4]["took_cache"]
    clients_ok = clients_ok and all(r["kernels_built"] == 0 for r in rows[4:])
    return 0 if all(r["same_outputs"] for r in rows) and clients_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
