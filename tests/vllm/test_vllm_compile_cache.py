"""SHARE_COMPILE_CACHE with real vLLM and its default torch.compile (no --enforce-eager):
a new instance, its model at another path, takes its seed's compile cache before vLLM
starts and skips compiling what the seed compiled; a cache from an open source or one made
under another key is refused, and the instance compiles itself and answers the same; one
corrupted on the way is rejected whole and taken again.

Each instance gets its own VLLM_CACHE_ROOT, so nothing is shared through the disk.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from netloader.testing.vllm import VllmInstance, make_weightless_dir, running
from support.proxy import FaultyProxy
from support.vllm_checks import Starter, assert_loaded_over_network

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


def test_a_client_at_another_path_takes_the_cache_before_vllm_starts_and_compiles_nothing(
    start: Starter,
    seed: VllmInstance,
    reference: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """A weightless client whose model directory is at another path than the seed's (vLLM's
    cache key includes it): its API server takes the seed's cache, vLLM's model-inspection
    cache included, before it inspects the model; its worker checks the key's factors and
    moves the cache to vLLM's own key; vLLM builds no kernel."""
    source = start.source("cc_seed")
    root = tmp_path / "client-cache"
    elsewhere = make_weightless_dir(tiny_model, tmp_path / "elsewhere" / "tiny")
    config = {"MODEL": "tiny", "SOURCE": [source]}
    with compiled(start, "cc_client", elsewhere, config, root, secret=True) as client:
        assert_loaded_over_network(client, source["sources"][0])
        early = netloader_says(client, f"rank 0, before vLLM starts: {TOOK}")
        assert len(early) == 1, client.netloader_lines()
        assert (root / "modelinfos").is_dir()
        assert len(netloader_says(client, "found the compile cache in place")) == 1
        moved = netloader_says(client, "moved the seed's compile cache")
        assert len(moved) == 1 and str(tiny_model) in moved[0], client.netloader_lines()
        own_key = re.search(r" to ([0-9a-f]{64}), this instance's own key", moved[0])
        assert own_key is not None and own_key.group(1) not in early[0]
        assert client.completions() == reference
        # vLLM found every kernel where netloader wrote them and built none: no kernel is
        # newer than the moment the cache was taken (the log's clock has millisecond steps;
        # vLLM compiles seconds later).
        taken_at = datetime.strptime(
            early[0].split(" [netloader]")[0][-23:], "%Y-%m-%d %H:%M:%S,%f"
        )
        newest = max(p.stat().st_mtime for p in root.rglob("inductor_cache/**/*.so"))
        assert datetime.fromtimestamp(newest) <= taken_at + timedelta(seconds=1), early[0]
        # vLLM looked in the directory of its own key, where the cache had moved.
        looked = f"{root}/torch_compile_cache/torch_aot_compile/{own_key.group(1)}/rank_0_0"
        assert looked in client.log_text(), f"vLLM did not look in {looked}"


REFUSALS = {
    "no_secret": "proved the shared secret or a trusted certificate",
    "other_key": "its compile key differs: engine config: seed",
    "corrupted": "digest mismatch",  # before vLLM starts; its worker takes it again
}


@pytest.fixture(scope="module")
def refused(
    start: Starter, seed: VllmInstance, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, tuple[VllmInstance, str]]]:
    """One instance per REFUSALS case, each with the weights on disk too (without the
    secret they come from there), started together: case -> (instance, its source)."""
    address = start.source("cc_seed")["sources"][0]
    # The proxy flips one byte 1 MB into the cache that the API server takes first.
    proxy = FaultyProxy(address, flip_at=1 << 20)
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
    assert instance.completions() == reference
    if case == "corrupted":  # rejected whole, then taken again by the worker, verified
        said = netloader_says(instance, "takes no compile cache before vLLM starts")
        assert len(said) == 1 and REFUSALS[case] in said[0], instance.netloader_lines()
        assert len(netloader_says(instance, f"rank 0 {TOOK}")) == 1
        assert_loaded_over_network(instance, source)
        return
    said = netloader_says(instance, COMPILES_ITSELF)
    assert len(said) == 1 and REFUSALS[case] in said[0], instance.netloader_lines()
    assert netloader_says(instance, f"rank 0 {TOOK}") == []
