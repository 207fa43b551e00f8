"""vLLM instances that find each other through a Redis registry (REGISTRY), with no
SOURCE: a seed registers itself once it serves; a new instance asks the registry for live
servers of its model and rank and loads from one; outputs identical at temperature 0. The
new instance also exposes its worker's metrics (METRICS_PORT). Instances started together
with JOIN_WAVE form a chain through the registry; SIGTERM drains an instance: its record
goes at once, the transfer in progress finishes."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from netloader import Client
from netloader.discovery.registry import Group, Registry
from netloader.manifest import Manifest
from netloader.tensors import dtype_from_name
from netloader.testing.vllm import VllmInstance, free_port, running
from support.proxy import FaultyProxy
from support.redis_server import RedisServer, needs_redis
from support.servers import run_cli
from support.vllm_checks import Starter, assert_loaded_over_network, serve_line, wave_positions

pytestmark = [pytest.mark.vllm, needs_redis, pytest.mark.timeout(1800)]


def test_a_client_with_only_a_registry_loads_from_a_registered_seed(
    start: Starter,
    seed32: VllmInstance,
    reference32: dict[str, str],
    tiny_model: Path,
    client_model_dir: Path,
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path)
    try:
        config = {"MODEL": "tiny", "REGISTRY": redis.url}
        with start("registry_seed", tiny_model, config, dtype="float32") as seed:
            address = serve_line(seed).group(4)
            listed = run_cli("peers", "--registry", redis.url, "--model", "tiny", "--json")
            assert listed.returncode == 0, listed.stderr
            assert address in {p["address"] for p in json.loads(listed.stdout)}, listed.stdout
            metrics_port = free_port()
            client_config = {**config, "METRICS_PORT": metrics_port}
            with start(
                "registry_client", client_model_dir, client_config, dtype="float32"
            ) as client:
                assert_loaded_over_network(client, address)
                assert client.completions() == reference32
                # The worker's metrics (METRICS_PORT + rank 0): the load path it took.
                url = f"http://127.0.0.1:{metrics_port}/metrics"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    text = answer.read().decode()
                assert 'netloader_vllm_loads_total{path="peer",reason=""} 1.0' in text, text
                assert 'netloader_vllm_load_phase_duration_seconds_count{phase="pull"} 1.0' in text
                assert "netloader_received_bytes_total" in text
                # Loaded, the client has registered too: the next instance has two seeds.
                again = run_cli("peers", "--registry", redis.url, "--model", "tiny", "--json")
                assert serve_line(client).group(4) in {
                    p["address"] for p in json.loads(again.stdout)
                }
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def live_servers(redis: RedisServer) -> list[str]:
    registry = Registry(redis.url, timeout=2)
    try:
        return registry.servers(Group("tiny", 1, 1, 0))
    finally:
        registry.close()


def test_a_registry_wave_forms_a_chain_and_sigterm_drains_a_member(
    start: Starter,
    reference32: dict[str, str],
    tiny_model: Path,
    client_model_dir: Path,
    redis: RedisServer,
) -> None:
    """A seed registers; two weightless instances started together with JOIN_WAVE claim
    positions 0 and 1: the first pulls from the seed, the second from the first (relayed),
    and both serve afterwards. Then SIGTERM to the second while a client pulls from it
    (slowly, through a rate-limited proxy): its record leaves the registry before that
    transfer ends, and the transfer completes, verified."""
    config = {"MODEL": "tiny", "REGISTRY": redis.url}
    with start("regwave_seed", tiny_model, config, dtype="float32") as seed:
        seed_address = serve_line(seed).group(4)
        wave = {**config, "JOIN_WAVE": True}
        # vLLM kills its processes at SIGTERM unless --shutdown-timeout gives them time.
        grace = ("--shutdown-timeout", "20")
        members = [
            start(f"regwave_{i}", client_model_dir, wave, dtype="float32", extra_args=grace)
            for i in (0, 1)
        ]
        with running(*members):
            by_position = wave_positions(members)
            assert sorted(by_position) == [0, 1]
            (first, first_address), (second, second_address) = by_position[0], by_position[1]
            assert_loaded_over_network(first, seed_address)
            assert_loaded_over_network(second, first_address)  # not from the seed
            for member, _ in by_position.values():
                assert member.completions() == reference32
            assert {seed_address, first_address, second_address} <= set(live_servers(redis))

            served = int(serve_line(second).group(3))
            proxy = FaultyProxy(second_address, rate=served / 3)  # about 3 s for it all
            try:
                manifest = Client([second_address]).manifest()
                outcome = pull_in_thread(proxy.address, manifest)
                while proxy.forwarded < served // 4 and outcome.thread.is_alive():
                    time.sleep(0.02)
                second.terminate()  # SIGTERM, as an orchestrator stops an instance
                while second_address in live_servers(redis):
                    time.sleep(0.02)
                withdrawn = time.monotonic()
                outcome.thread.join(30)
                assert outcome.error is None, outcome.error
                assert outcome.finished is not None and withdrawn < outcome.finished
                assert any("draining" in line for line in second.netloader_lines())
            finally:
                proxy.close()


class Outcome:
    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.finished: float | None = None
        self.thread = threading.Thread(target=lambda: None)


def pull_in_thread(address: str, manifest: Manifest) -> Outcome:
    """Pull all of `manifest` from `address` in a thread, verified; the outcome says how
    it ended and when."""
    outcome = Outcome()
    dest = {t.name: torch.empty(t.shape, dtype=dtype_from_name(t.dtype)) for t in manifest.tensors}

    def pull() -> None:
        try:
            # tcp: same-host would read the server's memory past the proxy's rate limit.
            client = Client([address], transport="tcp")
            client.load_into(dest, manifest.identity, within=manifest)
            outcome.finished = time.monotonic()
        except BaseException as exc:
            outcome.error = exc

    outcome.thread = threading.Thread(target=pull, daemon=True)
    outcome.thread.start()
    return outcome
