"""vLLM instances that find each other through a Redis registry (REGISTRY), with no
SOURCE: a seed registers itself once it serves; a new instance asks the registry for live
servers of its model and rank and loads from one; outputs identical at temperature 0. The
new instance also exposes its worker's metrics (METRICS_PORT)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from netloader.testing.vllm import VllmInstance, free_port
from support.redis_server import RedisServer, needs_redis
from support.servers import run_cli
from support.vllm_checks import Starter, assert_loaded_over_network, serve_line

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
