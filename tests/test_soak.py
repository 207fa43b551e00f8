"""Soak: hundreds of pulls, several at a time, against one server process. Its resident
memory, open file descriptors and thread count must come back to where they were.
NETLOADER_SOAK_PULLS sets the number of pulls (default 1000); the figures are printed and
written to runs/soak.json."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tensorsets import empty_like_set, model_like, same_bytes

from netloader import Client, Identity

PULLS = int(os.environ.get("NETLOADER_SOAK_PULLS", "1000"))
AT_ONCE = 6
WARMUP = 20


def _usage(pid: int) -> dict[str, int]:
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return {
        "rss_kb": int(status["VmRSS"].split()[0]),
        "threads": int(status["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def _settled(pid: int, baseline: dict[str, int], timeout: float = 10) -> dict[str, int]:
    """Usage once the server has finished closing connections (threads end just after
    the client's last byte)."""
    deadline = time.monotonic() + timeout
    usage = _usage(pid)
    while time.monotonic() < deadline and (
        usage["threads"] > baseline["threads"] or usage["fds"] > baseline["fds"]
    ):
        time.sleep(0.05)
        usage = _usage(pid)
    return usage


def test_soak_resources_stay_flat(start_server) -> None:
    server = start_server("model_like", "--model", "m", "--chunk-bytes", str(1 << 20))
    pid = server.proc.pid
    expected = model_like()
    size = sum(t.nbytes for t in expected.values())

    def pull(_: int) -> bool:
        dest = empty_like_set(expected)
        Client([server.address]).load_into(dest, Identity("m"))
        return all(same_bytes(dest[n], t) for n, t in expected.items())

    with ThreadPoolExecutor(AT_ONCE) as pool:
        assert all(pool.map(pull, range(WARMUP)))
        before = _settled(pid, _usage(pid))
        started = time.monotonic()
        assert all(pool.map(pull, range(PULLS)))
        seconds = time.monotonic() - started
    after = _settled(pid, before)
    figures = {
        "pulls": PULLS,
        "concurrent": AT_ONCE,
        "bytes_per_pull": size,
        "seconds": round(seconds, 2),
        "before": before,
        "after": after,
    }
    print(f"\nsoak: {json.dumps(figures)}")
    runs = Path(__file__).parents[1] / "runs"
    runs.mkdir(exist_ok=True)
    (runs / "soak.json").write_text(json.dumps(figures, indent=1))
    assert after["fds"] == before["fds"], figures
    assert after["threads"] == before["threads"], figures
    assert after["rss_kb"] - before["rss_kb"] < 16 * 1024, figures  # no per-pull growth
    assert server.proc.poll() is None
