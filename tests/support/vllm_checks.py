"""What the vLLM end-to-end tests read from an instance's log: the lines netloader writes
when it loads, serves and falls back; and `Starter`, which starts instances with the
session's vLLM python and log directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from netloader.testing.processes import read_address_file
from netloader.testing.vllm import VllmInstance

LOADED = re.compile(
    r"netloader: loaded (\d+) tensors, (\d+) bytes in .* from (\S+) over ([\w+-]+), verified"
)
SERVES = re.compile(
    r"netloader: rank (\d+) serves (\d+) tensors \((\d+) bytes\) on (\S+); "
    r"(\d+) bytes kept beyond the running model \(INT8_CACHE=(\w+)\)"
)
JOINED = re.compile(r"netloader: rank 0 is member (\d+) of the wave in \S+, relaying on (\S+);")
FALLBACK = "loads from disk with the default loader"
SECRET = "a shared secret for the tests"


class Starter:
    """Starts VllmInstances with the session's python and log directory."""

    def __init__(self, python: str, logs: Path) -> None:
        self.python, self.logs = python, logs

    def __call__(self, name: str, model: Path, config: dict[str, Any], **kw: Any) -> VllmInstance:
        return VllmInstance(self.python, model, config, workdir=self.logs, name=name, **kw)

    def prefix(self, name: str) -> str:
        return str(self.logs / f"{name}_")

    def source(self, name: str, rank: int = 0) -> dict[str, Any]:
        return {
            "device_id": rank,
            "sources": [read_address_file(Path(f"{self.prefix(name)}{rank}.txt"))],
        }


def loaded_lines(instance: VllmInstance) -> list[re.Match[str]]:
    return [m for line in instance.netloader_lines() if (m := LOADED.search(line))]


def serve_line(instance: VllmInstance, rank: int = 0) -> re.Match[str]:
    found = [m for line in instance.netloader_lines() if (m := SERVES.search(line))]
    found = [m for m in found if int(m.group(1)) == rank]
    assert len(found) == 1, (
        f"{instance.name}: no serve line for rank {rank}:\n{instance.log_tail()}"
    )
    return found[0]


def fallback_reasons(instance: VllmInstance) -> list[str]:
    return [
        line.split(FALLBACK + ": ", 1)[1] for line in instance.netloader_lines() if FALLBACK in line
    ]


def assert_loaded_over_network(
    instance: VllmInstance, source: str, ranks: int = 1, transport: str | None = None
) -> None:
    """`instance` loaded every rank from `source` (over `transport`, when given)."""
    found = loaded_lines(instance)
    assert len(found) == ranks, f"{instance.name}:\n" + "\n".join(instance.netloader_lines())
    assert all(m.group(3) == source for m in found), (source, [m.group(0) for m in found])
    if transport is not None:
        assert all(m.group(4) == transport for m in found), [m.group(0) for m in found]
    assert fallback_reasons(instance) == [], instance.netloader_lines()
