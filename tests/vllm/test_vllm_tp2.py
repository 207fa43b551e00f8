"""Tensor parallel 2: one tp=2 seed that loaded from disk is the reference and the source
for both ways a tp=2 instance loads over the network: each rank from the seed's rank (the
same layout), and each rank from a checkpoint-format server through vLLM's load_weights.
A tp=2 start is the slowest here, so the seed is started once for the module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import PROMPTS, VllmInstance
from support.vllm_checks import (
    Starter,
    checkpoint_lines,
    fallback_reasons,
    loaded_lines,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

TP2: dict[str, Any] = {"dtype": "float32", "tensor_parallel": 2, "ready_timeout": 300}


@pytest.fixture(scope="module")
def seed_tp2(start: Starter, tiny_model: Path) -> Iterator[VllmInstance]:
    config = {"MODEL": "tiny", "OUTPUT_PREFIX": start.prefix("seed_tp2")}
    with start("seed_tp2", tiny_model, config, **TP2) as seed:
        yield seed


@pytest.fixture(scope="module")
def reference_tp2(seed_tp2: VllmInstance) -> dict[str, str]:
    return seed_tp2.completions(PROMPTS[:3])


def test_tp2_client_loads_each_rank_from_the_seeds_rank(
    start: Starter,
    seed_tp2: VllmInstance,
    reference_tp2: dict[str, str],
    client_model_dir: Path,
) -> None:
    for rank in (0, 1):
        served = serve_line(seed_tp2, rank)
        assert 0 < int(served.group(5)) < int(served.group(3))
    sources = [start.source("seed_tp2", rank) for rank in (0, 1)]
    config = {"MODEL": "tiny", "SOURCE": sources}
    with start("client_tp2", client_model_dir, config, **TP2) as client:
        found = loaded_lines(client)
        assert sorted(m.group(3) for m in found) == sorted(s["sources"][0] for s in sources)
        assert fallback_reasons(client) == []
        assert client.completions(PROMPTS[:3]) == reference_tp2


def test_tp2_loads_from_a_checkpoint_server(
    start: Starter,
    checkpoint_server: ServerProcess,
    reference_tp2: dict[str, str],
    tiny_model: Path,
    client_model_dir: Path,
) -> None:
    """Each rank of a tp=2 instance streams the whole checkpoint through load_weights,
    which cuts its shard; outputs match the tp=2 seed that loaded from disk."""
    sources = [{"device_id": r, "sources": [checkpoint_server.address]} for r in (0, 1)]
    config = {"MODEL": "tiny", "SOURCE": sources}
    with start("ckpt_tp2", client_model_dir, config, **TP2) as tp2:
        found = checkpoint_lines(tp2)
        assert sorted(m.group(4, 5) for m in found) == [("0", "2"), ("1", "2")], found
        checkpoint_bytes = sum(
            t.nbytes for t in load_file(tiny_model / "model.safetensors").values()
        )
        assert all(int(m.group(2)) == checkpoint_bytes for m in found)
        assert fallback_reasons(tp2) == []
        assert loaded_lines(tp2) != []  # the windows, each a verified transfer
        assert tp2.completions(PROMPTS[:3]) == reference_tp2
