"""What the benchmarks share: timing, results and their table, the verdict against the
best raw path, spawned child processes that report back over a pipe, a `netloader serve`
process, setup steps, JSON results, and emptying the page cache. Imported by the scripts
in this directory (run as `.venv/bin/python benchmarks/bench_x.py`, which puts this
directory on the path)."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as PipeEnd
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from netloader.testing.processes import ServerProcess, netloader_command

CHILD_START_TIMEOUT = 120.0  # a raw sender loads and pre-faults the checkpoint first
CHILD_EXIT_TIMEOUT = 60.0  # a child that finished its rounds exits within this
SERVER_START_TIMEOUT = 300.0


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---- timing and results -------------------------------------------------------------------


@dataclass
class Result:
    section: str  # "a", "b" or "c"
    path: str
    seconds: float | None  # the representative time (median or single); None if skipped
    samples: list[float] = field(default_factory=list)
    raw: bool = False  # an inter-process raw path, eligible as "best raw path"
    note: str = ""


def median_result(section: str, path: str, samples: list[float], **kw: Any) -> Result:
    note = kw.pop("note", "")
    spread = f"median of {len(samples)}, min {min(samples):.3f} max {max(samples):.3f}"
    return Result(section, path, statistics.median(samples), samples, note=f"{spread}{note}", **kw)


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def interleaved(rounds: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Time each variant `repeat` times, alternating variants, so that slow drift of a
    noisy machine hits every variant alike."""
    samples: dict[str, list[float]] = {name: [] for name in rounds}
    for _ in range(repeat):
        for name, fn in rounds.items():
            samples[name].append(timed(fn))
    return samples


# ---- report -------------------------------------------------------------------------------


def best_raw(results: Sequence[Result]) -> Result:
    candidates = [r for r in results if r.raw and r.seconds]
    if not candidates:
        raise RuntimeError("no raw path was measured")
    return min(candidates, key=lambda r: r.seconds or math.inf)


def table(results: Sequence[Result], nbytes: int) -> Iterator[str]:
    best = best_raw(results)
    assert best.seconds is not None
    yield f"{nbytes} bytes ({nbytes / 2**30:.2f} GiB) per transfer; % = of {best.path}\n"
    yield "| part | path | seconds | GB/s | % of best raw | note |"
    yield "|---|---|---:|---:|---:|---|"
    for r in results:
        if r.seconds is None:
            yield f"| {r.section} | {r.path} | - | - | - | {r.note} |"
            continue
        gbps = nbytes / r.seconds / 1e9
        pct = 100 * best.seconds / r.seconds
        yield (f"| {r.section} | {r.path} | {r.seconds:.3f} | {gbps:.2f} | {pct:.0f}% | {r.note} |")


def local(result: Result) -> bool:
    """A same-host row: its limit is memcpy, not a network path."""
    return "same-host" in result.path


def same_host_verdict(results: Sequence[Result]) -> str:
    """The same-host pull into touched memory against memcpy and the tcp pull."""
    by_path = {r.path: r.seconds for r in results if r.seconds}
    pull = by_path.get("netloader same-host: repeated pulls, touched tensors")
    memcpy = by_path.get("memcpy: torch copy_, 1 process, touched destination")
    tcp = by_path.get("netloader tcp: repeated pulls, touched tensors")
    if pull is None or memcpy is None:
        return "RESULT same-host: not measured"
    line = (
        "RESULT same-host: the pull into touched tensors ran at "
        f"{100 * memcpy / pull:.0f}% of memcpy (target >= 70%)"
    )
    if tcp is not None:
        line += f" and {tcp / pull:.2f}x the tcp pull (target >= 2x)"
    return line + ", verification on"


def verdict(results: Sequence[Result]) -> tuple[bool, str]:
    best = best_raw(results)
    assert best.seconds is not None
    pulls = [
        r
        for r in results
        if r.path.startswith("netloader ") and "repeated pulls" in r.path and not local(r)
    ]
    if not pulls:
        return False, "netloader in-memory pull: not measured"
    top = min(pulls, key=lambda r: r.seconds or math.inf)
    assert top.seconds is not None
    pct = 100 * best.seconds / top.seconds
    reached = pct >= 90
    firsts = ", ".join(
        f"{r.path.split(':')[0]} first pull {100 * best.seconds / r.seconds:.0f}%"
        for r in results
        if r.path.startswith("netloader ") and "first pull" in r.path and r.seconds and not local(r)
    )
    line = (
        f"RESULT: netloader's in-memory pull {'REACHED' if reached else 'did NOT reach'} 90% "
        f"of the best raw path: {top.path} at {pct:.0f}% of {best.path} "
        f"({firsts}; first pulls go into untouched memory)"
    )
    return reached, line


# ---- child processes ----------------------------------------------------------------------


def start_child(target: Callable[..., None], *args: Any) -> tuple[BaseProcess, PipeEnd, int]:
    """Spawn `target(*args, pipe)`; it sends ("ready", port) once it listens, or
    ("error", traceback). Returns the process, our end of the pipe and the port."""
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, child_end), daemon=True)
    proc.start()
    child_end.close()
    if not parent_end.poll(CHILD_START_TIMEOUT):
        raise RuntimeError(f"{target.__name__} did not start in {CHILD_START_TIMEOUT} s")
    status, value = parent_end.recv()
    if status != "ready":
        raise RuntimeError(f"{target.__name__} failed:\n{value}")
    return proc, parent_end, int(value)


def stop_child(proc: BaseProcess, pipe: PipeEnd, ok: bool) -> None:
    """Let a child that finished its rounds exit; end one that did not at once."""
    proc.join(CHILD_EXIT_TIMEOUT if ok else 1)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)
    with contextlib.suppress(EOFError, OSError):
        while pipe.poll(0):  # a child's error report, if it sent one before exiting
            status, value = pipe.recv()
            if status == "error":
                print(f"warning: raw sender failed:\n{value}", file=sys.stderr)
    pipe.close()


def drop_page_cache() -> str | None:
    """Empty the page cache; returns why it cannot, or None once done."""
    if os.geteuid() != 0:
        return "skipped: not root"
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"skipped: cannot write /proc/sys/vm/drop_caches ({exc.strerror})"
    return None


def serve_checkpoint(
    model_dir: Path,
    log: Path,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    verbose: bool = False,
) -> ServerProcess:
    """`netloader serve MODEL_DIR --listen 127.0.0.1:0` as a subprocess, once it listens;
    `.address` is where, `.ready["model"]` what it serves; stop it with `.stop()`.
    `verbose`: it logs each transfer."""
    argv = [netloader_command(), *(["-v"] if verbose else []), "serve", str(model_dir)]
    argv += ["--listen", "127.0.0.1:0"]
    return ServerProcess([*argv, *extra_args], log=log, env=env, timeout=SERVER_START_TIMEOUT)


REPO = Path(__file__).resolve().parents[1]


def run_setup(cmd: list[str], timeout: float) -> str:
    """A setup step (scripts/setup_vllm.sh, a model builder) from the repository root; its
    last line of output is the answer. Exits with its error output if it fails."""
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:2])} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def vllm_and_llama(size: str) -> tuple[str, Path]:
    """(the vLLM venv's python, the `scripts/make_tiny_llama.py --size SIZE` model), each
    set up or built on first use and cached."""
    python = run_setup(["bash", str(REPO / "scripts" / "setup_vllm.sh")], 1800)
    builder = [python, str(REPO / "scripts" / "make_tiny_llama.py"), str(REPO / "runs" / "models")]
    return python, Path(run_setup([*builder, "--size", size], 1800))


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")
