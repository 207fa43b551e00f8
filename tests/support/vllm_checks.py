"""What the vLLM end-to-end tests read from an instance's log: the lines netloader writes
when it loads, serves and falls back; and `Starter`, which starts instances with the
session's vLLM python and log directory."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import netloader
from netloader import Client, Manifest
from netloader.config import DRAFT_PORT_OFFSET
from netloader.tensors import dtype_from_name
from netloader.testing.models import TensorSpec, empty_like
from netloader.testing.processes import ServerProcess, netloader_command, read_address_file
from netloader.testing.vllm import VllmInstance, free_port

LOADED = re.compile(
    r"netloader: loaded (\d+) tensors, (\d+) bytes in .* from (\S+) over ([\w+-]+), verified"
)
SERVES = re.compile(
    r"netloader: rank (\d+) serves (\d+) tensors \((\d+) bytes\) on (\S+); "
    r"(\d+) bytes kept beyond the running model \(INT8_CACHE=(\w+)\)"
)
DRAFT_SERVES = re.compile(r"netloader: rank 0 draft serves (\d+) tensors \((\d+) bytes\) on (\S+);")
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


def wave_positions(members: Sequence[VllmInstance]) -> dict[int, tuple[VllmInstance, str]]:
    """Each wave member by the position it logged it joined at, with the address it relays
    on; each must have joined exactly once."""
    found = {}
    for member in members:
        joined = [m for line in member.netloader_lines() if (m := JOINED.search(line))]
        assert len(joined) == 1, member.netloader_lines()
        found[int(joined[0].group(1))] = (member, joined[0].group(2))
    return found


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


def port_pair() -> int:
    """A free port whose draft twin (+10000, where a speculative draft listens) is free too."""
    for _ in range(50):
        port = free_port()
        if port + DRAFT_PORT_OFFSET <= 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + DRAFT_PORT_OFFSET))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


# ---- checkpoint-format sources (`netloader serve MODEL_DIR`) ------------------------------
CHECKPOINT_LOADED = re.compile(
    r"netloader: loaded (\d+) checkpoint tensors, (\d+) bytes from (\S+) through the "
    r"model's load_weights in .* for tp rank (\d+)/(\d+), pp rank (\d+)/(\d+), verified"
)


def serve_directory(directory: Path, log: Path, *args: str) -> ServerProcess:
    """`netloader serve DIRECTORY --model tiny`, until the test stops it."""
    argv = [netloader_command(), "serve", str(directory), "--model", "tiny", *args]
    return ServerProcess(argv, log=log, stop_signal=signal.SIGINT)


def pull_no_weights(source: str, out: Path, *args: str) -> Path:
    """`netloader pull --no-weights`: what a node that starts with nothing runs first."""
    done = subprocess.run(
        [netloader_command(), "pull", source, "--out", str(out), "--no-weights", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not [f for f in out.iterdir() if f.name.endswith(".safetensors")]
    assert {"config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    return out


def checkpoint_lines(instance: VllmInstance) -> list[re.Match[str]]:
    return [m for line in instance.netloader_lines() if (m := CHECKPOINT_LOADED.search(line))]


def pull_parameters(address: str, model: str) -> tuple[Manifest, dict[str, torch.Tensor]]:
    """What a vLLM instance serves, pulled with the Python API by the model's name alone
    into tensors made from its manifest, every chunk verified: (manifest, tensors)."""
    manifest = Client([address]).manifest()
    specs = [TensorSpec(t.name, dtype_from_name(t.dtype), t.shape) for t in manifest.tensors]
    dest = empty_like(specs, fill=0)
    report = netloader.load(dest, [address], model)
    assert report.tensors == len(dest) > 0, report.summary()
    return manifest, dest
