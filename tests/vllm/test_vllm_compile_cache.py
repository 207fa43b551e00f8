"""SHARE_COMPILE_CACHE with real vLLM and its default torch.compile (no --enforce-eager):
a new instance takes its seed's compile cache with its weights and skips compiling what
the seed compiled; a cache from an open source, one made under another key, or one
corrupted on the way is refused, and the instance compiles itself and answers the same.

Each instance gets its own VLLM_CACHE_ROOT, so nothing is shared through the disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from netloader.testing.vllm import VllmInstance, running
from support.proxy import FaultyProxy
from support.vllm_checks import Starter, assert_loaded_over_network, serve_line

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

SECRET = "the compile cache e2e secret"
TOOK = "took the compile cache"
COMPILES_ITSELF = "compiles itself"


def kernels(root: Path) -> set[str]:
    """The compiled kernels in a cache root (what a cache hit need not build again)."""
    return {p.name for p in root.rglob("inductor_cache/**/*.so")}


def compiled(start: Starter, name: str, model: Path, config: dict[str, Any], root: Path,
             secret: bool = False, **kw: Any) -> VllmInstance:  # fmt: skip
    env = {"VLLM_CACHE_ROOT": str(root)} | ({"NETLOADER_SECRET": SECRET} if secret else {})
    return start(name, model, {**config, "SHARE_COMPILE_CACHE": True}, dtype="float32",
                 enforce_eager=False, env=env, ready_timeout=400, **kw)  # fmt: skip


def netloader_says(instance: VllmInstance, text: str) -> list[str]:
    return [line for line in instance.netloader_lines() if text in line]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("seed-cache")


@pytest.fixture(scope="module")
def reference(start: Starter, tiny_model: Path, cache_root: Path) -> dict[str, str]:
    """An open seed compiles from an empty cache (the cache the others come from)."""
    with compiled(start, "cc_cold_seed", tiny_model, {"MODEL": "tiny"}, cache_root) as seed:
        assert kernels(cache_root), "the seed compiled nothing"
        return seed.completions()


@pytest.fixture(scope="module")
def seed(
    start: Starter, tiny_model: Path, cache_root: Path, reference: dict[str, str]
) -> Iterator[VllmInstance]:
    """The same seed restarted on its warm cache, now with a secret."""
    config = {"MODEL": "tiny", "OUTPUT_PREFIX": start.prefix("cc_seed")}
    with compiled(start, "cc_seed", tiny_model, config, cache_root, secret=True) as warm:
        assert warm.completions() == reference
        yield warm


def test_a_client_takes_weights_and_compile_cache_and_compiles_nothing(
    start: Starter,
    seed: VllmInstance,
    reference: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """The client names the seed's model directory: vLLM's cache key includes the model's
    path (a fleet mounts the model at one path); its weights still come from the seed."""
    source = start.source("cc_seed")
    root = tmp_path / "client-cache"
    config = {"MODEL": "tiny", "SOURCE": [source]}
    with compiled(start, "cc_client", tiny_model, config, root, secret=True) as client:
        assert_loaded_over_network(client, source["sources"][0])
        took = netloader_says(client, TOOK)
        assert len(took) == 1, client.netloader_lines()
        assert client.completions() == reference
        # vLLM found every kernel where netloader wrote them and built none: no kernel is
        # newer than the moment the cache was taken (the log's clock has millisecond steps;
        # vLLM compiles seconds later).
        taken_at = datetime.strptime(took[0].split(" [netloader]")[0][-23:], "%Y-%m-%d %H:%M:%S,%f")
        newest = max(p.stat().st_mtime for p in root.rglob("inductor_cache/**/*.so"))
        assert datetime.fromtimestamp(newest) <= taken_at + timedelta(seconds=1), took[0]
        # vLLM's own key is the one netloader computed: it looked in that very directory.
        key = took[0].split(", key ")[1].split(":")[0]
        looked = f"{root}/torch_compile_cache/torch_aot_compile/{key}/rank_0_0"
        assert looked in client.log_text(), f"vLLM did not look in {looked}"


REFUSALS = {
    "no_secret": "proved the shared secret or a trusted certificate",
    "other_key": "its compile key differs: engine config: seed",
    "corrupted": "digest mismatch",
}


@pytest.fixture(scope="module")
def refused(
    start: Starter, seed: VllmInstance, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[VllmInstance, str]]]:
    """One instance per REFUSALS case, each with the weights on disk too (without the
    secret they come from there), started together: case -> (instance, its source)."""
    address = start.source("cc_seed")["sources"][0]
    # The proxy flips one byte: past the weights (which arrive first), 1 MB into the cache.
    proxy = FaultyProxy(address, flip_at=int(serve_line(seed).group(3)) + (1 << 20))
    instances = {}
    for case in REFUSALS:
        source = proxy.address if case == "corrupted" else address
        config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [source]}]}
        # Another engine configuration makes another cache key.
        kw: dict[str, Any] = {"extra_args": ("--max-num-batched-tokens", "768")}
        instance = compiled(
            start, f"cc_{case}", tiny_model, config, tmp_path_factory.mktemp(f"cache_{case}"),
            secret=case != "no_secret", **(kw if case == "other_key" else {}),
        )  # fmt: skip
        instances[case] = (instance, source)
    try:
        with running(*(instance for instance, _ in instances.values())):
            yield instances
    finally:
        proxy.close()


@pytest.mark.parametrize("case", REFUSALS)
def test_a_refused_cache_leaves_the_instance_compiling_itself(
    refused: dict[str, tuple[VllmInstance, str]], reference: dict[str, str], case: str
) -> None:
    instance, source = refused[case]
    said = netloader_says(instance, COMPILES_ITSELF)
    assert len(said) == 1 and REFUSALS[case] in said[0], instance.netloader_lines()
    assert netloader_says(instance, TOOK) == []
    assert instance.completions() == reference
    if case == "corrupted":
        assert_loaded_over_network(instance, source)
