"""An emulated cluster on one machine, for tests and benchmarks: hosts are network
namespaces on one bridge, each with its own address and its own rate-limited link
(`tc tbf` on both ends of its veth pair: upload and download). Created and removed by
this code; needs root and the `ip` and `tc` tools (`Cluster.unavailable()` says why not).

    with Cluster([Link(200), Link(200), Link(1000)]) as cluster:
        proc = cluster.popen(0, ["python", "server.py"])   # runs inside host 0
        cluster.address(0)                                  # "10.x.y.1"
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TBF_LATENCY = "50ms"  # queueing allowed before tbf drops: enough for TCP to find the rate


@dataclass(frozen=True)
class Link:
    """A host's link to the bridge, in Mbit/s per direction (None: unlimited)."""

    up_mbit: float | None
    down_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.down_mbit is None:  # symmetric unless told otherwise
            object.__setattr__(self, "down_mbit", self.up_mbit)


class Cluster:
    def __init__(self, links: Sequence[Link]) -> None:
        if not 1 <= len(links) <= 250:
            raise ValueError("a cluster has 1 to 250 hosts")
        self.links = list(links)
        tag = secrets.token_hex(2)
        self.bridge = f"nlb{tag}"
        self.namespaces = [f"nl{tag}-{i}" for i in range(len(links))]
        self._veths = [f"nl{tag}v{i}" for i in range(len(links))]
        octets = secrets.token_bytes(2)
        self._prefix = f"10.{200 + octets[0] % 50}.{octets[1]}"
        self._up = False

    @staticmethod
    def unavailable() -> str | None:
        """Why an emulated cluster cannot be built here, or None if it can."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
        if missing:
            return f"missing tools: {', '.join(missing)}"
        return None

    def address(self, host: int) -> str:
        return f"{self._prefix}.{host + 1}"

    def popen(self, host: int, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a process inside `host`'s namespace (`ip netns exec` execs it, so the
        Popen's pid is the process itself)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[host], *argv], **kwargs)

    def run(self, host: int, argv: Sequence[str]) -> str:
        return _run("ip", "netns", "exec", self.namespaces[host], *argv)

    # ---- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        reason = self.unavailable()
        if reason:
            raise RuntimeError(f"cannot build an emulated cluster: {reason}")
        self._up = True
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
            _run("ip", "link", "set", self.bridge, "up")
            for i, link in enumerate(self.links):
                self._add_host(i, link)
        except BaseException:
            self.close()
            raise
        return self

    def _add_host(self, i: int, link: Link) -> None:
        ns, veth = self.namespaces[i], self._veths[i]
        _run("ip", "netns", "add", ns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _run("ip", "link", "set", veth, "master", self.bridge, "up")
        _run("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
        _run("ip", "-n", ns, "link", "set", "eth0", "up")
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # Upload: what leaves the host; download: what the bridge sends into it.
        if link.up_mbit is not None:
            _run("tc", "-n", ns, "qdisc", "add", "dev", "eth0", *_tbf(link.up_mbit))
        if link.down_mbit is not None:
            _run("tc", "qdisc", "add", "dev", veth, *_tbf(link.down_mbit))

    def close(self) -> None:
        """Remove every namespace (which removes its veth pair) and the bridge."""
        if not self._up:
            return
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, check=False)
        self._up = False

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tbf(mbit: float) -> list[str]:
    rate_bytes = mbit * 1e6 / 8
    burst = max(32 << 10, int(rate_bytes / 100))  # at least one timer tick's worth
    return ["root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst), "latency", TBF_LATENCY]


def _run(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip() or done.returncode}")
    return done.stdout
