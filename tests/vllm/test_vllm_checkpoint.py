"""vLLM instances that load from checkpoint-format sources (`netloader serve MODEL_DIR`):
any tensor-parallel size, through vLLM's own `load_weights`, no weight file on the
client; and nodes that start with nothing (`netloader pull --no-weights`, from a
checkpoint server or from a vLLM seed). Outputs at temperature 0 are compared with an
instance that loaded from disk."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from netloader.testing.processes import ServerProcess, netloader_command
from netloader.testing.vllm import PROMPTS, VllmInstance
from support.vllm_checks import (
    Starter,
    assert_loaded_over_network,
    fallback_reasons,
    loaded_lines,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

CHECKPOINT_LOADED = re.compile(
    r"netloader: loaded (\d+) checkpoint tensors, (\d+) bytes from (\S+) through the "
    r"model's load_weights in .* for tp rank (\d+)/(\d+), pp rank (\d+)/(\d+), verified"
)


def serve_directory(directory: Path, log: Path, *args: str) -> ServerProcess:
    """`netloader serve DIRECTORY --model tiny`, until the test stops it."""
    argv = [netloader_command(), "serve", str(directory), "--model", "tiny", *args]
    return ServerProcess(argv, log=log, stop_signal=signal.SIGINT)


def pull_no_weights(source: str, out: Path, *args: str) -> Path:
    """`netloader pull --no-weights`: what a node that starts with nothing runs first."""
    done = subprocess.run(
        [netloader_command(), "pull", source, "--out", str(out), "--no-weights", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert not [f for f in out.iterdir() if f.name.endswith(".safetensors")]
    assert {"config.json", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    return out


def checkpoint_lines(instance: VllmInstance) -> list[re.Match[str]]:
    return [m for line in instance.netloader_lines() if (m := CHECKPOINT_LOADED.search(line))]


@pytest.fixture(scope="module")
def checkpoint_server(tiny_model: Path, vllm_logs: Path) -> Iterator[ServerProcess]:
    with serve_directory(tiny_model, vllm_logs / "checkpoint_server.log") as server:
        yield server


def test_an_empty_node_starts_from_a_checkpoint_server(
    start: Starter,
    checkpoint_server: ServerProcess,
    reference32: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """pull --no-weights, then vLLM with SOURCE = the checkpoint server: the checkpoint's
    tensors (bfloat16, the checkpoint's names) go through vLLM's load_weights into a
    float32 model with fused layers; no weight file ever touches this node's disk."""
    node = pull_no_weights(checkpoint_server.address, tmp_path / "node")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (node / name).read_bytes() == (tiny_model / name).read_bytes()
    config = {
        "MODEL": "tiny",
        "SOURCE": [{"device_id": 0, "sources": [checkpoint_server.address]}],
        "OUTPUT_PREFIX": str(tmp_path / "node_"),
    }
    with start("ckpt_node", node, config, dtype="float32") as node_instance:
        found = checkpoint_lines(node_instance)
        assert len(found) == 1, node_instance.netloader_lines()
        checkpoint = load_file(tiny_model / "model.safetensors")
        assert int(found[0].group(1)) == len(checkpoint)
        assert int(found[0].group(2)) == sum(t.nbytes for t in checkpoint.values())
        assert fallback_reasons(node_instance) == []
        assert node_instance.completions() == reference32
        # Loaded, it serves its own (vLLM-layout) parameters to the next instance.
        assert int(serve_line(node_instance).group(3)) > 0


def test_a_same_layout_peer_is_preferred_to_a_checkpoint_source(
    start: Starter,
    seed32: VllmInstance,
    checkpoint_server: ServerProcess,
    reference32: dict[str, str],
    client_model_dir: Path,
) -> None:
    peer = start.source("seed32")["sources"][0]
    config = {
        "MODEL": "tiny",
        "SOURCE": [{"device_id": 0, "sources": [checkpoint_server.address, peer]}],
    }
    with start("ckpt_mixed", client_model_dir, config, dtype="float32") as client:
        assert_loaded_over_network(client, peer)
        assert checkpoint_lines(client) == []
        assert client.completions() == reference32


def test_an_empty_node_starts_from_a_vllm_seed(
    start: Starter, seed32: VllmInstance, reference32: dict[str, str], tmp_path: Path
) -> None:
    """A vLLM seed serves its model directory's files too: pull --no-weights from it,
    then load the weights from it."""
    seed = start.source("seed32")["sources"][0]
    node = pull_no_weights(seed, tmp_path / "node", "--model", "tiny")
    config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [seed]}]}
    with start("vllm_node", node, config, dtype="float32") as client:
        assert_loaded_over_network(client, seed)
        assert client.completions() == reference32


def test_tp2_loads_from_the_same_checkpoint_server(
    start: Starter, checkpoint_server: ServerProcess, tiny_model: Path, client_model_dir: Path
) -> None:
    """Each rank of a tp=2 instance streams the whole checkpoint through load_weights,
    which cuts its shard; outputs match a tp=2 instance loaded from disk."""
    kw: dict[str, Any] = {"dtype": "float32", "tensor_parallel": 2, "ready_timeout": 300}
    with start("ckpt_tp2_disk", tiny_model, {"MODEL": "tiny"}, **kw) as disk:
        expected = disk.completions(PROMPTS[:3])
    sources = [{"device_id": r, "sources": [checkpoint_server.address]} for r in (0, 1)]
    with start("ckpt_tp2", client_model_dir, {"MODEL": "tiny", "SOURCE": sources}, **kw) as tp2:
        found = checkpoint_lines(tp2)
        assert sorted(m.group(4, 5) for m in found) == [("0", "2"), ("1", "2")], found
        checkpoint_bytes = sum(
            t.nbytes for t in load_file(tiny_model / "model.safetensors").values()
        )
        assert all(int(m.group(2)) == checkpoint_bytes for m in found)
        assert fallback_reasons(tp2) == []
        assert loaded_lines(tp2) != []  # the windows, each a verified transfer
        assert tp2.completions(PROMPTS[:3]) == expected


MISSING = {
    "tensor_missing": "mlp.down_proj.weight",
    "fused_part_missing": "self_attn.q_proj.weight",
}


def _altered_copy(tiny_model: Path, out: Path, case: str) -> Path:
    shutil.copytree(tiny_model, out)
    if case in MISSING:  # a whole parameter, or one part of a fused one (qkv_proj)
        tensors = load_file(out / "model.safetensors")
        dropped = sorted(n for n in tensors if n.endswith(MISSING[case]))[0]
        del tensors[dropped]
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:  # the same shapes, another configuration: what tells two fine-tunes apart
        config = json.loads((out / "config.json").read_text())
        config["rope_theta"] = float(config.get("rope_theta", 10000.0)) * 2
        (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tensor_missing", "model.layers.0.mlp.down_proj.weight were not loaded"),
        ("fused_part_missing", "model.layers.0.self_attn.qkv_proj.weight were not loaded"),
        ("config_differs", "holds a model of another configuration"),
    ],
)
def test_a_bad_checkpoint_source_falls_back_naming_it(
    start: Starter,
    reference32: dict[str, str],
    tiny_model: Path,
    tmp_path: Path,
    vllm_logs: Path,
    case: str,
    reason: str,
) -> None:
    altered = _altered_copy(tiny_model, tmp_path / case, case)
    with serve_directory(altered, vllm_logs / f"checkpoint_{case}.log") as server:
        config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [server.address]}]}
        with start(f"ckpt_{case}", tiny_model, config, dtype="float32") as instance:
            reasons = fallback_reasons(instance)
            assert len(reasons) == 1 and reason in reasons[0], instance.netloader_lines()
            assert checkpoint_lines(instance) == []
            assert instance.completions() == reference32


def test_an_int8_model_loads_from_its_checkpoint_server(
    start: Starter, w8a8_model: Path, vllm_logs: Path, tmp_path: Path
) -> None:
    """W8A8 (int8 weights, float scales): load_weights places both; the strict check
    (quantized parameters must all come from the checkpoint) passes."""
    with start("ckpt_w8a8_disk", w8a8_model, {"MODEL": "tiny"}) as disk:
        expected = disk.completions()
    with serve_directory(w8a8_model, vllm_logs / "checkpoint_w8a8.log") as server:
        node = pull_no_weights(server.address, tmp_path / "node")
        config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [server.address]}]}
        with start("ckpt_w8a8", node, config) as client:
            assert len(checkpoint_lines(client)) == 1, client.netloader_lines()
            assert fallback_reasons(client) == []
            assert client.completions() == expected
