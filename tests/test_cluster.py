"""Scale-out on an emulated cluster of network namespaces with rate-limited links (see
netloader.testing.cluster), driven by the scenario code benchmarks/bench_cluster.py times
(netloader.testing.cluster_scenarios). Skipped where the machine cannot build one (not
root, no `ip`/`tc`). No timing assertions: the benchmark reports the times."""

from __future__ import annotations

import subprocess

import pytest

from netloader.testing.cluster import Cluster, Link
from netloader.testing.cluster_scenarios import striping, wave

pytestmark = pytest.mark.skipif(
    Cluster.unavailable() is not None, reason=f"no emulated cluster: {Cluster.unavailable()}"
)


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_chain_wave_relays_member_to_member_and_cleans_up() -> None:
    with Cluster([Link(400)] * 4) as cluster:
        names = list(cluster.namespaces)
        assert all(name in _namespaces() for name in names)
        run = wave(cluster, clients=3, fanout=1, size_mib=16, chunk_kib=512)
        members = [f"{cluster.address(1 + i)}" for i in range(3)]
    assert len(run["per_client"]) == 3  # every client verified bit-identical (checked in wave)
    sources = run["sources"]
    assert sources[0] == [f"{cluster.address(0)}:7000"]
    assert [s[0].rsplit(":", 1)[0] for s in sources[1:]] == members[:2]  # each from the previous
    assert not any(name in _namespaces() for name in names)


def test_striping_finishes_bit_identical_when_a_seed_is_killed() -> None:
    with Cluster([Link(200)] * 3 + [Link(None)]) as cluster:
        run = striping(cluster, seeds=3, size_mib=96, chunk_kib=1024, kill_after=0.4)
    assert run["identical"]
    assert len(run["failures"]) == 1, run
    assert len(run["bytes_by_source"]) == 3  # the killed seed delivered part before dying
