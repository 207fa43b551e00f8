"""Tensor parallel 2: one tp=2 seed that loaded from disk is the reference and the source
for both ways a tp=2 instance loads over the network: each rank from the seed's rank (the
same layout), and each rank from a checkpoint-format server through vLLM's load_weights.
A tp=2 start is the slowest here, so the seed is started once for the module, and the
checkpoint-loaded instance also takes a live update, switching both ranks or neither."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

from netloader.cli.update import end_unswitched
from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import PROMPTS, VllmError, VllmInstance
from support.proxy import FaultyProxy
from support.servers import run_cli
from support.vllm_checks import (
    Starter,
    checkpoint_lines,
    fallback_reasons,
    loaded_lines,
    serve_directory,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

TP2: dict[str, Any] = {"dtype": "float32", "tensor_parallel": 2, "ready_timeout": 300}
UPDATES = ("--weight-transfer-config", '{"backend": "netloader"}')


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


@pytest.fixture(scope="module")
def fine_checkpoint(tiny_model: Path, vllm_logs: Path) -> Iterator[ServerProcess]:
    """The tiny checkpoint served in 16 KiB chunks, so that its tensors span several
    chunks (a real model's do at 16 MiB), its matrices cut into 8 column tiles: a rank
    can pull only the rows, or the columns, it keeps."""
    log = vllm_logs / "fine_checkpoint.log"
    args = ("--chunk-kib", "16", "--column-tiles", "8")
    with serve_directory(tiny_model, log, *args) as server:
        yield server


def sharded_bytes(tiny_model: Path) -> tuple[int, int]:
    """(bytes of the tensors vLLM shards at tp=2: every matrix, by rows or by columns;
    bytes of all the others: the norms, replicated)."""
    tensors = load_file(tiny_model / "model.safetensors")
    sharded = sum(t.nbytes for t in tensors.values() if t.dim() == 2)
    return sharded, sum(t.nbytes for t in tensors.values()) - sharded


@pytest.fixture(scope="module")
def ckpt_tp2(
    start: Starter, fine_checkpoint: ServerProcess, client_model_dir: Path
) -> Iterator[VllmInstance]:
    """A weightless tp=2 instance loading from the checkpoint server, with live updates on
    (vLLM's weight-update routes and the netloader backend)."""
    sources = [{"device_id": r, "sources": [fine_checkpoint.address]} for r in (0, 1)]
    config = {"MODEL": "tiny", "SOURCE": sources}
    live = {"env": {"VLLM_SERVER_DEV_MODE": "1"}, "extra_args": UPDATES}
    with start("ckpt_tp2", client_model_dir, config, **TP2, **live) as tp2:
        yield tp2


def test_tp2_ranks_pull_only_their_shards_from_a_checkpoint_server(
    ckpt_tp2: VllmInstance, reference_tp2: dict[str, str], tiny_model: Path
) -> None:
    """Each rank of a tp=2 instance streams the checkpoint through load_weights, which
    cuts its shard; a dry run of load_weights found which rows (qkv, gate/up, embeddings)
    or columns (o_proj, down_proj) each rank keeps, so about half of every matrix moves
    to each rank, the norms whole. Outputs match the tp=2 seed that loaded from disk."""
    tp2 = ckpt_tp2
    found = checkpoint_lines(tp2)
    assert sorted(m.group(4, 5) for m in found) == [("0", "2"), ("1", "2")], found
    sharded, others = sharded_bytes(tiny_model)
    slack = 2 * 16 * 9 * 4 << 10  # at most a chunk at each end of each sharded tensor
    for m in found:
        assert sharded // 2 + others <= int(m.group(2)) <= sharded // 2 + others + slack
    plans = [line for line in tp2.netloader_lines() if "tp rank" in line and "pulls" in line]
    assert len(plans) == 2, tp2.netloader_lines()
    assert all(p.endswith("pulls 30 tensors by the part this rank keeps") for p in plans)
    assert fallback_reasons(tp2) == []
    assert tp2.completions(PROMPTS[:3]) == reference_tp2


def test_tp2_switches_both_ranks_to_a_new_version_or_neither(
    ckpt_tp2: VllmInstance, reference_tp2: dict[str, str], v2_model: Path, vllm_logs: Path
) -> None:
    """A live update whose rank 1 pulls through a proxy that flips a byte: rank 1 cannot
    stage it, so neither rank switches and the instance answers exactly as before. The
    same update with both ranks on the good source then switches both (told, with
    `--drop-previous`, to stop serving version 1)."""
    log = vllm_logs / "tp2_v2.log"
    with serve_directory(v2_model, log, "--version", "2") as v2:
        proxy = FaultyProxy(v2.address, flip_at=300_000)
        good = {"version": "2", "sources": [v2.address]}
        try:
            ckpt_tp2._post("/start_weight_update", {}, 60)
            refused = {**good, "sources": [proxy.address]}
            with pytest.raises(VllmError, match="1 of 2 ranks could not stage it"):
                ckpt_tp2._post("/update_weights", {"update_info": [good, refused]}, 120)
            end_unswitched(ckpt_tp2.base_url, 60)
        finally:
            proxy.close()
        said = [line for line in ckpt_tp2.netloader_lines() if "keeps its weights" in line]
        assert len(said) == 2, ckpt_tp2.netloader_lines()
        assert any("rank 1: " in line and "digest mismatch" in line for line in said), said
        assert any("1 other rank(s) could not stage it" in line for line in said), said
        assert ckpt_tp2.completions(PROMPTS[:3]) == reference_tp2
        done = run_cli(
            "update", ckpt_tp2.base_url, "--version", "2", "--source", v2.address,
            "--drop-previous",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    switched = [line for line in ckpt_tp2.netloader_lines() if "switched to version 2" in line]
    assert len(switched) == 2, ckpt_tp2.netloader_lines()
    # Told to, each rank's server stopped serving the version it loaded.
    dropped = [line for line in ckpt_tp2.netloader_lines() if "no longer the version it" in line]
    assert sorted(line.split(" serves on ")[0][-6:] for line in dropped) == ["rank 0", "rank 1"]
    assert ckpt_tp2.completions(PROMPTS[:3]) != reference_tp2


def test_tp2_rejects_a_corrupt_range_and_falls_back(
    start: Starter,
    fine_checkpoint: ServerProcess,
    reference_tp2: dict[str, str],
    tiny_model: Path,
) -> None:
    """Rank 0 pulls through a proxy that flips a byte among its rows: the chunk is
    rejected by its digest and rank 0 loads from disk, saying so; rank 1 pulls its rows
    directly. The instance answers as the seed does."""
    proxy = FaultyProxy(fine_checkpoint.address, flip_at=300_000)
    try:
        sources = [
            {"device_id": 0, "sources": [proxy.address]},
            {"device_id": 1, "sources": [fine_checkpoint.address]},
        ]
        config = {"MODEL": "tiny", "SOURCE": sources}
        with start("ckpt_tp2_corrupt", tiny_model, config, **TP2) as tp2:
            reasons = fallback_reasons(tp2)
            assert len(reasons) == 1 and "digest mismatch" in reasons[0], reasons
            assert [m.group(4) for m in checkpoint_lines(tp2)] == ["1"]
            assert tp2.completions(PROMPTS[:3]) == reference_tp2
    finally:
        proxy.close()
