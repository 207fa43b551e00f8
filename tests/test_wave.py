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
from tensorsets import big, empty_like_set, model_like, same_bytes
from test_cli import NETLOADER, serve

import netloader
from netloader import Identity, LoadedTensors, NetloaderConfig, SourceUnavailable
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


def test_rank_api_wave_relays_then_serves_the_loaded_model(tmp_path: Path) -> None:
    """The per-rank API an engine integration uses (WAVE_DIR): a seed writes its
    OUTPUT_PREFIX file into the wave; member 0 pulls from it through its relay, member 1
    from member 0; member 0 then serves its loaded model instead, and a member whose wave
    has no source learns why."""
    expected, identity = model_like(), Identity("m")
    wave_dir = tmp_path / "wave"
    seed_cfg = NetloaderConfig.load({"OUTPUT_PREFIX": f"{wave_dir}/seed-"}, environ={})
    member_cfg = NetloaderConfig.load({"WAVE_DIR": str(wave_dir)}, environ={})
    seed = netloader.serve_rank(expected, identity, seed_cfg, 0)
    relays = [netloader.relay_rank(member_cfg, 0) for _ in range(2)]
    assert seed is not None and all(r is not None for r in relays)
    try:
        dests = []
        for i, relay in enumerate(relays):
            assert relay is not None
            position, sources = netloader.join_wave(member_cfg, 0, relay)
            assert position == i
            upstream = [] if i == 0 else [relays[0].address]  # type: ignore[union-attr]
            assert sources == [*upstream, seed.address]
            dest = empty_like_set(expected)
            report = netloader.load_rank(
                dest, identity, member_cfg, 0, sources=sources, relay=relay
            )
            assert report.sources == (str(sources[0]),)  # the upstream member, not the seed
            assert all(same_bytes(dest[n], t) for n, t in expected.items())
            dests.append(dest)
        first = relays[0]
        assert first is not None
        first.serve_instead(LoadedTensors(dests[0], identity))
        again = empty_like_set(expected)
        netloader.load(again, [first.address], model_name="m")
        assert all(same_bytes(again[n], t) for n, t in expected.items())
        with pytest.raises(SourceUnavailable, match="no sources for rank 1"):
            netloader.load_rank({}, identity, member_cfg, 1, sources=[])
    finally:
        seed.close()
        for relay in relays:
            if relay is not None:
                relay.close()
