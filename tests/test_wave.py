"""Waves of real processes on loopback: `netloader pull --wave` forming a relay chain, and
the per-rank API an engine integration uses. The directory bookkeeping alone is tested
in tests/unit/test_wave.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file

import netloader
from netloader import Identity, NetloaderConfig, SourceUnavailable
from netloader.testing.models import blocks, same_bytes, transformer_like, write_checkpoint
from netloader.testing.processes import WAVE_MEMBER, ServerProcess
from support.servers import NETLOADER, StartCliServer, run_cli
from support.tensors import empty_like_set


def test_cli_wave_forms_a_chain_of_real_processes(
    tmp_path: Path, cli_server: StartCliServer
) -> None:
    expected = blocks(16)
    ckpt = write_checkpoint(tmp_path / "ckpt", expected).parent
    (ckpt / "config.json").write_text('{"model_type": "blocks"}')
    wave_dir = tmp_path / "wave"
    address = cli_server(ckpt, "--output-prefix", f"{wave_dir}/seed-").address
    members: list[ServerProcess] = []
    try:
        for i in range(3):
            out = str(tmp_path / f"m{i}")
            argv = [NETLOADER, "pull", "--wave", str(wave_dir), "--out", out]
            # each has joined (in order) once it says so
            members.append(ServerProcess(argv, log=tmp_path / f"m{i}.log", ready=WAVE_MEMBER))
        for m in members:
            m.read_until("until interrupted")
        # A finished member serves the files it pulled too: the next node can start empty.
        files = run_cli("pull", members[2].address, "--out", str(tmp_path / "n"), "--no-weights")
        assert files.returncode == 0, files.stderr
        assert (tmp_path / "n" / "config.json").read_bytes() == (ckpt / "config.json").read_bytes()
    finally:
        codes = [m.stop(timeout=20) for m in members]
    assert codes == [0, 0, 0], [m.log_text() for m in members]
    outputs = [m.output for m in members]
    member_addresses = [m.address for m in members]
    assert f"pulling from {address}" in outputs[0]
    assert f"pulling from {member_addresses[0]}, {address}" in outputs[1]
    assert f"pulling from {member_addresses[1]}, {member_addresses[0]}, {address}" in outputs[2]
    assert f"from {member_addresses[1]} over same-host, verified" in outputs[2]
    for i in range(3):
        got = load_file(tmp_path / f"m{i}" / "model.safetensors")
        assert (tmp_path / f"m{i}" / "config.json").exists()
        assert all(same_bytes(got[n], expected[n]) for n in expected)


def test_rank_api_wave_relays_then_serves_the_loaded_model(tmp_path: Path) -> None:
    """The per-rank API an engine integration uses (WAVE_DIR): a seed writes its
    OUTPUT_PREFIX file into the wave; member 0 pulls from it through its relay, member 1
    from member 0; member 0 then serves its loaded model instead, and a member whose wave
    has no source learns why."""
    expected, identity = transformer_like(), Identity("m")
    wave_dir = tmp_path / "wave"
    seed_cfg = NetloaderConfig.load({"OUTPUT_PREFIX": f"{wave_dir}/seed-"}, environ={})
    member_cfg = NetloaderConfig.load({"WAVE_DIR": str(wave_dir)}, environ={})
    seed = netloader.serve_rank(expected, identity, seed_cfg, 0)
    maybe_relays = [netloader.relay_rank(member_cfg, 0) for _ in range(2)]
    relays = [r for r in maybe_relays if r is not None]
    assert seed is not None and len(relays) == 2
    try:
        dests = []
        for i, relay in enumerate(relays):
            position, sources = netloader.join_wave(member_cfg, 0, relay)
            assert position == i
            upstream = [] if i == 0 else [relays[0].address]
            assert sources == [*upstream, seed.address]
            dest = empty_like_set(expected)
            report = netloader.load_rank(
                dest, identity, member_cfg, 0, sources=sources, relay=relay
            )
            assert report.sources == (str(sources[0]),)  # the upstream member, not the seed
            assert all(same_bytes(dest[n], t) for n, t in expected.items())
            dests.append(dest)
        first = relays[0]
        first.finish(dests[0], identity)
        again = empty_like_set(expected)
        netloader.load(again, [first.address], identity="m")
        assert all(same_bytes(again[n], t) for n, t in expected.items())
        with pytest.raises(SourceUnavailable, match="no sources for rank 1"):
            netloader.load_rank({}, identity, member_cfg, 1, sources=[])
    finally:
        seed.close()
        for relay in relays:
            relay.close()


def test_a_cli_member_whose_pull_fails_leaves_the_wave(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").write_text("127.0.0.1:1\n")  # nobody listens there
    result = run_cli("pull", "--wave", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "cannot connect to 127.0.0.1:1" in result.stderr
    assert list((tmp_path / "rank0").iterdir()) == []  # its record is gone
