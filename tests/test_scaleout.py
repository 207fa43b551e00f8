"""Several sources per client (striping) and clients that serve while they receive
(relaying), with real server processes on loopback. The emulated-cluster versions, with
rate-limited links, are in test_cluster.py and benchmarks/bench_cluster.py."""

from __future__ import annotations

import signal
import threading

import pytest
import torch

import netloader
from netloader import Client, Identity, SourceUnavailable
from netloader.testing.models import blocks, differing, experts
from support.servers import MakeProxy, StartServer
from support.tensors import empty_like_set

MIB = 1 << 20


def _all_same(dest: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    bad = differing(dest, expected)
    assert not bad, f"tensors differ: {bad}"


def test_stripes_across_every_source(start_server: StartServer) -> None:
    servers = [start_server("blocks", "--model", "m") for _ in range(3)]
    expected = blocks()
    dest = empty_like_set(expected)
    report = Client([s.address for s in servers]).load_into(dest, Identity("m"))
    _all_same(dest, expected)
    assert sorted(report.sources) == sorted(s.address for s in servers)
    assert sum(n for _, n in report.bytes_by_source) == 64 * MIB
    assert not report.failures


def test_faster_source_delivers_more(start_server: StartServer, proxy: MakeProxy) -> None:
    server = start_server("blocks", "--model", "m")
    fast = proxy(server.address, rate=60 * MIB)
    slow = proxy(server.address, rate=10 * MIB)
    expected = blocks()
    dest = empty_like_set(expected)
    report = Client([slow.address, fast.address]).load_into(dest, Identity("m"))
    _all_same(dest, expected)
    delivered = dict(report.bytes_by_source)
    assert delivered[fast.address] > 2 * delivered.get(slow.address, 0), delivered


# Few large tensors, and 4,096 small ones coalesced 64 to a chunk.
MODELS = {"blocks": ((), blocks), "experts": (("--chunk-bytes", str(MIB)), experts)}


@pytest.mark.parametrize("model", MODELS)
def test_source_killed_mid_transfer_others_finish(
    start_server: StartServer, proxy: MakeProxy, model: str
) -> None:
    args, make = MODELS[model]
    servers = [start_server(model, "--model", "m", *args) for _ in range(3)]
    throttled = [proxy(s.address, rate=20 * MIB) for s in servers]
    victim, victim_proxy = servers[0], throttled[0]
    expected = make()
    dest = empty_like_set(expected)

    def kill_victim_midway(_: int) -> None:
        if victim.proc.poll() is None and victim_proxy.forwarded > 4 * MIB:
            victim.proc.send_signal(signal.SIGKILL)

    report = Client([p.address for p in throttled], timeouts=netloader.Timeouts(stall=3)).load_into(
        dest, Identity("m"), progress=kill_victim_midway
    )
    assert victim.proc.poll() is not None, "the victim was not killed mid-transfer"
    _all_same(dest, expected)
    assert len(report.failures) == 1 and victim_proxy.address in report.failures[0]
    assert sum(n for _, n in report.bytes_by_source) == 64 * MIB  # nothing fetched twice


def test_frozen_source_is_replaced_by_the_others(
    start_server: StartServer, proxy: MakeProxy
) -> None:
    servers = [start_server("blocks", "--model", "m") for _ in range(2)]
    frozen = proxy(servers[0].address, freeze_after=6 * MIB)
    healthy = proxy(servers[1].address, rate=30 * MIB)
    expected = blocks()
    dest = empty_like_set(expected)
    report = Client(
        [frozen.address, healthy.address], timeouts=netloader.Timeouts(stall=1.5)
    ).load_into(dest, Identity("m"))
    _all_same(dest, expected)
    assert "sent nothing for 1.5 s" in report.failures[0]


def test_stripe_one_uses_sources_in_order(start_server: StartServer) -> None:
    servers = [start_server("blocks", "--model", "m") for _ in range(2)]
    dest = empty_like_set(blocks())
    report = Client([s.address for s in servers], stripe=1).load_into(dest, Identity("m"))
    assert report.sources == (servers[0].address,)


@pytest.mark.parametrize("model", MODELS)
def test_relay_serves_chunks_while_still_receiving(
    start_server: StartServer, proxy: MakeProxy, model: str
) -> None:
    args, make = MODELS[model]
    seed = start_server(model, "--model", "m", *args)
    upstream = proxy(seed.address, rate=40 * MIB)  # the relay's own pull takes ~1.6 s
    expected = make()
    relay_dest, client_dest = empty_like_set(expected), empty_like_set(expected)
    with netloader.relay() as relay_server:
        relay_report: list[netloader.LoadReport] = []
        relaying = threading.Thread(
            target=lambda: relay_report.append(
                netloader.load(relay_dest, [upstream.address], identity="m", relay=relay_server)
            )
        )
        relaying.start()
        relay_was_complete_at_first_chunk: list[bool] = []

        def note_first_chunk(_: int) -> None:
            if not relay_was_complete_at_first_chunk:
                relay_was_complete_at_first_chunk.append(upstream.forwarded >= 64 * MIB)

        report = Client([relay_server.address]).load_into(
            client_dest, Identity("m"), progress=note_first_chunk
        )
        relaying.join()
    _all_same(relay_dest, expected)
    _all_same(client_dest, expected)
    assert report.sources == (str(relay_server.address),)
    assert relay_was_complete_at_first_chunk == [False]
    assert relay_report[0].sources == (upstream.address,)


def test_relay_whose_upstream_dies_sends_its_clients_elsewhere(
    start_server: StartServer, proxy: MakeProxy
) -> None:
    seed = start_server("blocks", "--model", "m")
    backup = start_server("blocks", "--model", "m")
    upstream = proxy(seed.address, rate=30 * MIB)
    expected = blocks()
    relay_dest, client_dest = empty_like_set(expected), empty_like_set(expected)
    relay_error: list[BaseException] = []

    def relay_pull(server: netloader.Server) -> None:
        try:
            netloader.load(
                relay_dest,
                [upstream.address],
                identity="m",
                relay=server,
                timeouts=netloader.Timeouts(stall=2),
            )
        except netloader.TransferError as exc:
            relay_error.append(exc)

    def kill_seed_midway(_: int) -> None:
        if seed.proc.poll() is None and upstream.forwarded > 20 * MIB:
            seed.proc.send_signal(signal.SIGKILL)

    with netloader.relay() as relay_server:
        relaying = threading.Thread(target=relay_pull, args=(relay_server,))
        relaying.start()
        report = Client([relay_server.address, backup.address], stripe=1).load_into(
            client_dest, Identity("m"), progress=kill_seed_midway
        )
        relaying.join()
    assert relay_error, "the relay should have lost its upstream"
    _all_same(client_dest, expected)  # every byte verified, wherever it came from
    assert report.sources == (str(relay_server.address), backup.address)
    assert "relay lacks chunk" in report.failures[0]


def test_relay_without_upstream_manifest_says_so() -> None:
    with (
        netloader.relay(timeouts=netloader.Timeouts(stall=1)) as relay_server,
        pytest.raises(SourceUnavailable, match="no manifest from upstream"),
    ):
        Client([relay_server.address], timeouts=netloader.Timeouts(stall=2)).manifest()
