"""`netloader pull --out DIR` to disk, phase by phase, against its yardstick: an in-process
pull into memory plus writing the same bytes at the disk's measured speed.

Measures, in one run on loopback, each `--repeat` times (interleaved, medians reported):

  - the disk: `dd` of the checkpoint's size from /dev/zero with conv=fdatasync, into the
    directory the pulls write to, twice in a row: on a VM the first run also pays for
    memory the host has to back again (0.8 to 3.7 s here), the second is the disk's
    speed, and the yardstick's;
  - start-up alone: `python -c "import torch"` and `python -c "import netloader.cli"`;
  - an in-process pull (netloader.load into fresh tensors, transport `--transport`) from a
    real `netloader serve` process;
  - the CLI, `netloader -v pull ADDR --out DIR --transport T` into a fresh DIR: its wall
    time and the phases it logs (start-up: process start to the command; manifest;
    files; layout; receive; sync; rename; other files); "exit" is the rest of the wall
    time (interpreter teardown);
  - with `--baseline-src DIR`: the same CLI run from another source tree (PYTHONPATH=DIR,
    e.g. `git archive` of an older commit's src/), for a before/after in one run.

Target: CLI wall time <= 1.5 x (in-process pull + bytes / disk speed).

Usage (from the repository root):

    .venv/bin/python benchmarks/bench_pull_cli.py --size-mib 1024 --repeat 9 \\
        [--baseline-src /tmp/base/src] [--transport tcp] [--json runs/bench_pull_cli.json]

A benchmark command, not a test; on a 2-core machine run nothing else heavy meanwhile.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from common import progress, serve_checkpoint, write_json
from netloader.testing.processes import netloader_command

TIMEOUT = 600.0
TARGET = 1.5  # the CLI may take this many times (in-process pull + writing at disk speed)
PHASES = re.compile(r"netloader: pull phases: (?P<phases>.*)$", re.MULTILINE)
PHASE = re.compile(r"(?P<name>[a-z -]+) (?P<seconds>[0-9.]+) s")
DISK = "disk: dd conv=fdatasync, again"
SUMMARY = re.compile(r"netloader: pulled \d+ tensors, \d+ bytes in (?P<seconds>[0-9.]+) s")


def build_checkpoint(directory: Path, size_mib: int) -> Path:
    """A Llama-shaped checkpoint of about `size_mib`, kept for the next run."""
    from netloader.testing.models import llama_like, write_checkpoint

    path, stamp, made = directory / "model.safetensors", directory / "made", f"{size_mib} MiB"
    if not (path.exists() and stamp.exists() and stamp.read_text() == made):
        progress(f"building a {size_mib} MiB checkpoint in {directory}")
        write_checkpoint(directory, llama_like(size_mib << 20))
        stamp.write_text(made)
    return path


def disk_write(target: Path, nbytes: int) -> float:
    """Seconds `dd` takes to write `nbytes` to `target` and fdatasync it."""
    block = 16 << 20
    argv = ["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={-(-nbytes // block)}"]
    started = time.perf_counter()
    subprocess.run([*argv, "conv=fdatasync"], check=True, capture_output=True, timeout=TIMEOUT)
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def python_wall(code: str, env: Mapping[str, str] | None = None) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=TIMEOUT)
    return time.perf_counter() - started


def in_process_pull(ckpt: Path, address: str, transport: str) -> float:
    """One netloader.load into freshly allocated tensors; its LoadReport's seconds."""
    import netloader
    from netloader.testing.models import checkpoint_specs, empty_like

    dest = empty_like(checkpoint_specs(ckpt))
    identity = netloader.Client([address]).manifest().identity
    return netloader.load(dest, [address], identity, transport=transport).seconds


def cli_pull(
    address: str, out: Path, transport: str, env: Mapping[str, str] | None
) -> dict[str, float]:
    """`netloader -v pull` into a fresh `out`: wall time, its summary's seconds, and the
    phases it logs (none from a tree that does not log them)."""
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # earlier runs' dirty pages are not this run's to write
    argv = [netloader_command(), "-v", "pull", address, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(
        [*argv, "--transport", transport], capture_output=True, text=True, env=env, timeout=TIMEOUT
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"netloader pull failed: {done.stderr[-2000:]}")
    summary = SUMMARY.search(done.stdout)
    if summary is None:
        raise RuntimeError(f"no summary line in the pull's output: {done.stdout!r}")
    times = {"wall": wall, "summary": float(summary["seconds"])}
    if (phases := PHASES.search(done.stderr)) is not None:
        spans = {m["name"].strip(): float(m["seconds"]) for m in PHASE.finditer(phases["phases"])}
        times.update(spans)
        times["exit"] = wall - sum(spans.values())
    shutil.rmtree(out, ignore_errors=True)
    return times


def median(samples: Sequence[float]) -> str:
    return f"{statistics.median(samples):.3f}"


def spread(samples: Sequence[float]) -> str:
    return f"min {min(samples):.3f} max {max(samples):.3f}"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--transport", default="auto")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_pull_cli"))
    parser.add_argument(
        "--baseline-src", type=Path, help="Also time the CLI run from this source tree."
    )
    parser.add_argument("--json", type=Path, help="Write every sample here.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    ckpt = build_checkpoint(args.workdir / "ckpt", args.size_mib)
    nbytes = ckpt.stat().st_size
    runs: dict[str, Mapping[str, str] | None] = {"this tree": None}
    if args.baseline_src is not None:
        runs["baseline"] = {**os.environ, "PYTHONPATH": str(args.baseline_src.resolve())}
    samples: dict[str, list[float]] = {}

    def note(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    server = serve_checkpoint(ckpt.parent, args.workdir / "serve.log")
    try:
        address = server.address
        for round_ in range(args.repeat):
            progress(f"round {round_ + 1} of {args.repeat}")
            note("disk: dd conv=fdatasync, first", disk_write(args.workdir / "dd.bin", nbytes))
            note(DISK, disk_write(args.workdir / "dd.bin", nbytes))
            note("python -c 'import torch'", python_wall("import torch"))
            note("python -c 'import netloader.cli'", python_wall("import netloader.cli"))
            note("in-process pull, fresh tensors", in_process_pull(ckpt, address, args.transport))
            for label, env in runs.items():
                for phase, seconds in cli_pull(
                    address, args.workdir / "out", args.transport, env
                ).items():
                    note(f"CLI ({label}): {phase}", seconds)
    finally:
        server.stop(timeout=20)

    disk = statistics.median(samples[DISK])
    pull = statistics.median(samples["in-process pull, fresh tensors"])
    yardstick = pull + disk
    print(f"\n{nbytes} bytes; medians of {args.repeat}, {args.transport} transport\n")
    print("| what | seconds | GB/s | note |\n|---|---:|---:|---|")
    for name, values in samples.items():
        moved = any(word in name for word in ("disk", "in-process", "wall", "summary", "receive"))
        rate = f"{nbytes / statistics.median(values) / 1e9:.2f}" if moved else ""
        print(f"| {name} | {median(values)} | {rate} | {spread(values)} |")
    print(
        f"\nyardstick: in-process pull {pull:.3f} s + writing at the disk's speed {disk:.3f} s "
        f"= {yardstick:.3f} s; target {TARGET} x = {TARGET * yardstick:.3f} s"
    )
    for label in runs:
        wall = statistics.median(samples[f"CLI ({label}): wall"])
        verdict = "within" if wall <= TARGET * yardstick else "NOT within"
        line = (
            f"RESULT CLI ({label}): {wall:.3f} s = {wall / yardstick:.2f} x the yardstick, "
            f"{verdict} the target of {TARGET} x"
        )
        if started := samples.get(f"CLI ({label}): start-up"):
            rest = [w - s for w, s in zip(samples[f"CLI ({label}): wall"], started, strict=True)]
            line += (
                f"; after its start-up (process start to the command, "
                f"{statistics.median(started):.3f} s): "
                f"{statistics.median(rest) / yardstick:.2f} x"
            )
        print(line)
    if args.json is not None:
        write_json(args.json, {"bytes": nbytes, "transport": args.transport, **samples})
    return 0


if __name__ == "__main__":
    sys.exit(main())
