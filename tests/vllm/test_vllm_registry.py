"""vLLM instances that find each other through a Redis registry (REGISTRY), with no
SOURCE: a seed registers itself once it serves; a new instance asks the registry for live
servers of its model and rank and loads from one; outputs identical at temperature 0."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netloader.testing.vllm import VllmInstance
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
            with start("registry_client", client_model_dir, config, dtype="float32") as client:
                assert_loaded_over_network(client, address)
                assert client.completions() == reference32
                # Loaded, the client has registered too: the next instance has two seeds.
                again = run_cli("peers", "--registry", redis.url, "--model", "tiny", "--json")
                assert serve_line(client).group(4) in {
                    p["address"] for p in json.loads(again.stdout)
                }
    finally:
        redis.stop()
