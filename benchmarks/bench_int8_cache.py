"""What each INT8_CACHE mode really keeps, for an int8 (W8A8) model in vLLM: the seed
Worker's resident memory, ready and idle, against the same model loaded with vLLM's own
loader (`--load-format auto`), in one run; next to the bytes netloader's log line says it
keeps beyond the running model.

    .venv/bin/python benchmarks/bench_int8_cache.py --json runs/bench_int8_cache.json

Builds (once, cached in runs/models/) the untrained 1 GB Llama of scripts/make_tiny_llama.py
and its W8A8 quantization (scripts/make_w8a8.py). Uses scripts/setup_vllm.sh.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, run_setup, write_json
from netloader.testing.processes import process_usage
from netloader.testing.vllm import VllmInstance

MODELS = REPO / "runs" / "models"
WORKER = re.compile(r"\((?:VllmWorker-0|Worker) pid=(\d+)\)")
KEPT = re.compile(r"serves (\d+) tensors \((\d+) bytes\) on \S+; (\d+) bytes kept")
MODES: dict[str, dict[str, Any] | None] = {
    "vLLM default loader": None,
    "INT8_CACHE=no": {"INT8_CACHE": "no"},
    "INT8_CACHE=dram": {"INT8_CACHE": "dram"},
    "INT8_CACHE=hbm": {"INT8_CACHE": "hbm"},
    'INT8_CACHE=dram, NAME ["*.weight"]': {"INT8_CACHE": "dram", "INT8_CACHE_NAME": ["*.weight"]},
}


def worker_rss_kb(instance: VllmInstance, samples: int = 5) -> int:
    """The Worker's VmRSS once settled: the median of a few readings a second apart."""
    found = WORKER.findall(instance.log_text())
    assert found, f"no Worker pid in {instance.log_path}"
    pid = int(found[-1])
    readings = []
    for _ in range(samples):
        readings.append(process_usage(pid)["VmRSS"])
        time.sleep(1)
    return int(statistics.median(readings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1g", help="make_tiny_llama.py preset to quantize")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    python = run_setup(["bash", "scripts/setup_vllm.sh"], 1800)
    base = Path(
        run_setup([python, "scripts/make_tiny_llama.py", str(MODELS), "--size", args.size], 1800)
    )
    model = Path(
        run_setup(
            [python, "scripts/make_w8a8.py", str(base), str(MODELS / f"{base.name}-w8a8")], 900
        )
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as logs:
        for label, config in MODES.items():
            name = f"int8_{len(rows)}"
            instance = VllmInstance(
                python,
                model,
                None if config is None else {"MODEL": "w8a8", **config},
                workdir=Path(logs),
                name=name,
                load_format="auto" if config is None else "netloader",
                ready_timeout=600,
            )
            with instance:
                instance.complete("The cat", max_tokens=2)
                rss = worker_rss_kb(instance)
                kept = KEPT.search(instance.log_text())
            row = {"mode": label, "worker_rss_kb": rss}
            if kept:
                row.update(tensors=int(kept.group(1)), bytes=int(kept.group(2)))
                row["kept_bytes_logged"] = int(kept.group(3))
            rows.append(row)
            print(json.dumps(row), flush=True)
    default = rows[0]["worker_rss_kb"]
    print(f"\nW8A8 {args.size} model, Worker resident memory after the first completion")
    print("| mode | Worker RSS | vs vLLM's loader | kept, as logged |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        extra = (row["worker_rss_kb"] - default) * 1024
        logged = row.get("kept_bytes_logged")
        print(
            f"| {row['mode']} | {row['worker_rss_kb'] / 1024:.0f} MiB | {extra / 2**20:+.0f} MiB"
            f" | {'' if logged is None else f'{logged / 2**20:.0f} MiB'} |"
        )
    if args.json:
        write_json(args.json, rows)


if __name__ == "__main__":
    main()
