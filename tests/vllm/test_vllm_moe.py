"""A mixture-of-experts model (Qwen3-MoE, scripts/make_tiny_moe.py: 2 layers of 16 small
experts, 117 checkpoint tensors) loaded from a checkpoint-format source (`netloader serve
MOE_DIR`) through vLLM's load_weights, which stacks the per-expert tensors into fused
expert parameters; outputs at temperature 0 are compared with an instance that loaded the
same model from disk. Two vLLM starts, together."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from netloader.testing.vllm import VllmInstance, make_weightless_dir, running
from support.vllm_checks import (
    Starter,
    checkpoint_lines,
    fallback_reasons,
    serve_directory,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def moe_instances(
    start: Starter, moe_model: Path, vllm_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[dict[str, VllmInstance], str]]:
    """ "disk": loads the MoE model from its directory (no source for rank 0) and serves it;
    "network": a directory without weight files, the checkpoint server as its SOURCE.
    (instances, the checkpoint server's address)"""
    weightless = make_weightless_dir(moe_model, tmp_path_factory.mktemp("moe") / "tiny-moe")
    with serve_directory(moe_model, vllm_logs / "moe_checkpoint_server.log") as server:
        instances = {
            "disk": start(
                "moe_disk", moe_model,
                {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": []}],
                 "OUTPUT_PREFIX": start.prefix("moe_disk")},
                dtype="float32",
            ),
            "network": start(
                "moe_network", weightless,
                {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [server.address]}]},
                dtype="float32",
            ),
        }  # fmt: skip
        with running(*instances.values()):
            yield instances, server.address


def test_a_moe_model_loads_from_a_checkpoint_server(
    moe_instances: tuple[dict[str, VllmInstance], str], moe_model: Path
) -> None:
    instances, server = moe_instances
    disk, network = instances["disk"], instances["network"]
    reference = disk.completions()
    assert len(set(reference.values())) > 1, f"the model ignores the prompt: {reference}"
    found = checkpoint_lines(network)
    assert len(found) == 1, network.netloader_lines()
    assert found[0].group(3) == server
    checkpoint = load_file(moe_model / "model.safetensors")
    assert sum(".mlp.experts." in name for name in checkpoint) == 2 * 16 * 3
    assert int(found[0].group(1)) == len(checkpoint)
    assert int(found[0].group(2)) == sum(t.nbytes for t in checkpoint.values())
    assert fallback_reasons(network) == []
    assert network.completions() == reference
    # Both serve their loaded (vLLM-layout, fused-expert) parameters to the next instance.
    assert int(serve_line(disk).group(3)) > 0
    assert int(serve_line(network).group(3)) > 0
