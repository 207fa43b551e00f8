"""W8A8 int8 models (compressed-tensors, vLLM's CPU int8 kernel): what INT8_CACHE exists
for. One seed loads from disk (INT8_CACHE=no). Every other INT8_CACHE setting is an
instance without weight files that loads from it; they start together, with a
non-quantized instance that must refuse the seed, so their starts overlap. Each serves
the very bytes the seed serves (pulled and verified); a last client loads from the one
that keeps the fewest copies. The same seed is the reference for a client from a
checkpoint server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netloader.testing.vllm import PROMPTS, VllmInstance, make_weightless_dir, running
from support.vllm_checks import (
    Starter,
    assert_loaded_over_network,
    checkpoint_lines,
    fallback_reasons,
    loaded_lines,
    pull_no_weights,
    pull_parameters,
    serve_directory,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

# label -> (INT8_CACHE, INT8_CACHE_NAME) of the instances that load from the seed
SETTINGS: dict[str, tuple[str, list[str] | None]] = {
    "dram": ("dram", None),
    "hbm": ("hbm", None),
    "dram_named": ("dram", ["*.weight"]),
}
MISMATCH = "mismatch"  # a non-quantized instance that names the quantization it refuses


@pytest.fixture(scope="module")
def w8a8_seed(start: Starter, w8a8_model: Path) -> Iterator[VllmInstance]:
    config = {"MODEL": "tiny-w8a8", "INT8_CACHE": "no", "OUTPUT_PREFIX": start.prefix("w8a8")}
    with start("w8a8_seed", w8a8_model, config) as seed:
        yield seed


@pytest.fixture(scope="module")
def reference_w8a8(w8a8_seed: VllmInstance) -> dict[str, str]:
    return w8a8_seed.completions()


@pytest.fixture(scope="module")
def from_seed(
    start: Starter,
    w8a8_seed: VllmInstance,
    w8a8_model: Path,
    tiny_model: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, VllmInstance]]:
    """The instances that load from the seed, started together: one per INT8_CACHE
    setting, and the mismatched one."""
    client_dir = make_weightless_dir(w8a8_model, tmp_path_factory.mktemp("w8a8") / "w8a8")
    instances = {}
    for label, (mode, names) in SETTINGS.items():
        config: dict[str, Any] = {
            "MODEL": "tiny-w8a8",
            "SOURCE": [start.source("w8a8")],
            "INT8_CACHE": mode,
            "OUTPUT_PREFIX": start.prefix(f"w8a8_{label}"),
        }
        if names:
            config["INT8_CACHE_NAME"] = names
        instances[label] = start(f"w8a8_{label}", client_dir, config)
    mismatch = {"MODEL": "tiny-w8a8", "SOURCE": [start.source("w8a8")]}
    instances[MISMATCH] = start("w8a8_mismatch", tiny_model, mismatch)
    with running(*instances.values()):
        yield instances


def assert_keeps(instance: VllmInstance, mode: str, names: list[str] | None) -> None:
    """The bytes kept beyond the running model follow INT8_CACHE: `dram`/`hbm` keep a copy
    of every parameter (hbm is the parameters' own device, the CPU here), a name filter
    keeps fewer."""
    served = serve_line(instance)
    total, kept = int(served.group(3)), int(served.group(5))
    assert served.group(6) == mode, served.group(0)
    if mode in ("dram", "hbm") and not names:
        assert kept == total, served.group(0)
    elif names:
        assert 0 < kept < total, served.group(0)


def test_every_int8_cache_setting_loads_and_serves_the_seeds_bytes(
    start: Starter,
    w8a8_seed: VllmInstance,
    reference_w8a8: dict[str, str],
    from_seed: dict[str, VllmInstance],
    w8a8_model: Path,
    tmp_path: Path,
) -> None:
    assert_keeps(w8a8_seed, "no", None)
    seed_address = start.source("w8a8")["sources"][0]
    seed_manifest, _ = pull_parameters(seed_address, "tiny-w8a8")
    for label, (mode, names) in SETTINGS.items():
        instance = from_seed[label]
        assert_loaded_over_network(instance, seed_address)
        assert loaded_lines(instance)[0].group(2) == str(seed_manifest.total_bytes), label
        assert_keeps(instance, mode, names)
        assert instance.completions() == reference_w8a8, label
        # It serves what the seed serves, byte for byte: the same digests, and a pull
        # verified against them.
        manifest, _ = pull_parameters(serve_line(instance).group(4), "tiny-w8a8")
        assert manifest.tensors == seed_manifest.tensors, label
        assert manifest.digests == seed_manifest.digests, label
    # A client of the instance that kept the fewest copies answers identically.
    source = start.source("w8a8_dram_named")
    client_dir = make_weightless_dir(w8a8_model, tmp_path / "w8a8")
    with start("w8a8_client", client_dir, {"MODEL": "tiny-w8a8", "SOURCE": [source]}) as client:
        assert_loaded_over_network(client, source["sources"][0])
        assert client.completions() == reference_w8a8


def test_a_quantization_mismatch_falls_back_naming_it(from_seed: dict[str, VllmInstance]) -> None:
    client = from_seed[MISMATCH]
    reasons = fallback_reasons(client)
    assert len(reasons) == 1 and "quantization" in reasons[0], reasons
    assert "compressed-tensors" in reasons[0], reasons
    assert len(client.completions()) == len(PROMPTS)


def test_an_int8_model_loads_from_its_checkpoint_server(
    start: Starter,
    reference_w8a8: dict[str, str],
    w8a8_model: Path,
    vllm_logs: Path,
    tmp_path: Path,
) -> None:
    """W8A8 (int8 weights, float scales): load_weights places both; the strict check
    (quantized parameters must all come from the checkpoint) passes."""
    with serve_directory(w8a8_model, vllm_logs / "checkpoint_w8a8.log") as server:
        node = pull_no_weights(server.address, tmp_path / "node")
        config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [server.address]}]}
        with start("ckpt_w8a8", node, config) as client:
            assert len(checkpoint_lines(client)) == 1, client.netloader_lines()
            assert fallback_reasons(client) == []
            assert client.completions() == reference_w8a8
