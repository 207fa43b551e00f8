"""Wave discovery: the shared directory, and `netloader pull --wave` forming a relay chain
of real processes on loopback."""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from tensorsets import big, same_bytes
from test_cli import NETLOADER, serve

from netloader.wave import Wave


def test_positions_are_unique_and_ordered(tmp_path: Path) -> None:
    wave = Wave(tmp_path)
    assert [wave.join(f"10.0.0.{i}:7000") for i in range(4)] == [0, 1, 2, 3]
    assert wave.member(2) == "10.0.0.2:7000"
    assert sorted(p.name for p in (tmp_path / "rank0").iterdir()) == [
        f"0000{i}.txt" for i in range(4)
    ]  # no temporary files left behind


def test_chain_tree_and_unicast_sources(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").write_text("10.0.0.100:7000\n")
    (tmp_path / "seed-b-0.txt").write_text("10.0.0.101:7000\n")
    (tmp_path / "seed-10.txt").write_text("10.0.0.110:7000\n")  # rank 10, not rank 0
    seeds = ["10.0.0.100:7000", "10.0.0.101:7000"]
    chain = Wave(tmp_path)
    for i in range(7):
        chain.join(f"10.0.0.{i}:7000")
    assert chain.sources(0) == seeds
    assert chain.sources(3) == ["10.0.0.2:7000", "10.0.0.1:7000", "10.0.0.0:7000", *seeds]
    tree = Wave(tmp_path, fanout=2)
    assert [tree.parent(p) for p in range(7)] == [None, None, 0, 0, 1, 1, 2]
    assert tree.sources(6) == ["10.0.0.2:7000", "10.0.0.0:7000", *seeds]
    assert Wave(tmp_path, fanout=None).sources(5) == seeds
    assert Wave(tmp_path, rank=10).seeds() == ["10.0.0.110:7000"]


def test_cli_wave_forms_a_chain_of_real_processes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    expected = big(16)
    save_file(expected, ckpt / "model.safetensors")
    wave_dir = tmp_path / "wave"
    members: list[subprocess.Popen[str]] = []
    with contextmanager(serve)(ckpt, "--output-prefix", f"{wave_dir}/seed-") as (address, _):
        try:
            joined = []
            for i in range(3):
                out = str(tmp_path / f"m{i}")
                members.append(
                    subprocess.Popen(
                        [NETLOADER, "pull", "--wave", str(wave_dir), "--out", out],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
                joined.append(_read_until(members[-1], "wave member"))  # joins in order
            outputs = [
                j + _read_until(m, "until interrupted")
                for j, m in zip(joined, members, strict=True)
            ]
        finally:
            for m in members:
                m.send_signal(signal.SIGTERM)
                m.wait(timeout=20)
    assert all(m.returncode == 0 for m in members), [m.stderr.read() for m in members if m.stderr]
    member_addresses = [out.split("serving on ", 1)[1].split(",")[0] for out in outputs]
    assert f"pulling from {address}" in outputs[0]
    assert f"pulling from {member_addresses[0]}, {address}" in outputs[1]
    assert f"pulling from {member_addresses[1]}, {member_addresses[0]}, {address}" in outputs[2]
    assert f"from {member_addresses[1]} over tcp, verified" in outputs[2]
    for i in range(3):
        got = load_file(tmp_path / f"m{i}" / "model.safetensors")
        assert all(same_bytes(got[n], expected[n]) for n in expected)


def _read_until(member: subprocess.Popen[str], marker: str, timeout: float = 60) -> str:
    """A wave member's stdout up to the line containing `marker`."""
    assert member.stdout is not None
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = member.stdout.readline()
        if not line:
            errors = member.stderr.read() if member.stderr else ""
            pytest.fail(f"member exited: {''.join(lines)}{errors}")
        lines.append(line)
        if marker in line:
            return "".join(lines)
    pytest.fail("member did not finish in time")
