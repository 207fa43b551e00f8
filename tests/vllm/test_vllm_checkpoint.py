"""vLLM instances that load from checkpoint-format sources (`netloader serve MODEL_DIR`)
through vLLM's own `load_weights`, no weight file on the client; nodes that start with
nothing (`netloader pull --no-weights`, from a checkpoint server or from a vLLM seed); and
bad checkpoint sources. Outputs at temperature 0 are compared with an instance that
loaded from disk. tp=2 and int8 checkpoints are in test_vllm_tp2.py and test_vllm_int8.py,
beside the seeds they share."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import VllmInstance, running
from support.vllm_checks import (
    Starter,
    assert_loaded_over_network,
    checkpoint_lines,
    fallback_reasons,
    pull_no_weights,
    serve_directory,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def empty_nodes(
    start: Starter,
    seed32: VllmInstance,
    checkpoint_server: ServerProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, tuple[VllmInstance, Path]]]:
    """Two nodes that start with nothing: `pull --no-weights`, then vLLM, one with the
    checkpoint server as its SOURCE, one with the vLLM seed listed after it. The two
    instances start together. name -> (instance, its model directory)."""
    seed = start.source("seed32")["sources"][0]
    ckpt = checkpoint_server.address
    base = tmp_path_factory.mktemp("nodes")
    nodes = {
        "from_checkpoint": (pull_no_weights(ckpt, base / "ckpt"), [ckpt]),
        "from_seed": (pull_no_weights(seed, base / "seed", "--model", "tiny"), [ckpt, seed]),
    }
    instances = {
        name: (
            start(
                f"node_{name}", directory,
                {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": sources}]},
                dtype="float32",
            ),
            directory,
        )
        for name, (directory, sources) in nodes.items()
    }  # fmt: skip
    with running(*(instance for instance, _ in instances.values())):
        yield instances


def test_an_empty_node_starts_from_a_checkpoint_server(
    empty_nodes: dict[str, tuple[VllmInstance, Path]],
    reference32: dict[str, str],
    tiny_model: Path,
) -> None:
    """The checkpoint's tensors (bfloat16, the checkpoint's names) go through vLLM's
    load_weights into a float32 model with fused layers; no weight file ever touches
    this node's disk."""
    instance, node = empty_nodes["from_checkpoint"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (node / name).read_bytes() == (tiny_model / name).read_bytes()
    found = checkpoint_lines(instance)
    assert len(found) == 1, instance.netloader_lines()
    checkpoint = load_file(tiny_model / "model.safetensors")
    assert int(found[0].group(1)) == len(checkpoint)
    assert int(found[0].group(2)) == sum(t.nbytes for t in checkpoint.values())
    assert fallback_reasons(instance) == []
    assert instance.completions() == reference32
    # Loaded, it serves its own (vLLM-layout) parameters to the next instance.
    assert int(serve_line(instance).group(3)) > 0


def test_an_empty_node_starts_from_a_vllm_seed_preferred_to_a_checkpoint_source(
    start: Starter,
    empty_nodes: dict[str, tuple[VllmInstance, Path]],
    reference32: dict[str, str],
) -> None:
    """A vLLM seed serves its model directory's files too; listed after a checkpoint
    source, the same-layout peer is still the one the weights come from (no resharding
    through load_weights)."""
    instance, _ = empty_nodes["from_seed"]
    assert_loaded_over_network(instance, start.source("seed32")["sources"][0])
    assert checkpoint_lines(instance) == []
    assert instance.completions() == reference32


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


BAD_SOURCES = {
    "tensor_missing": "model.layers.0.mlp.down_proj.weight were not loaded",
    "fused_part_missing": "model.layers.0.self_attn.qkv_proj.weight were not loaded",
    "config_differs": "holds a model of another configuration",
}


@pytest.fixture(scope="module")
def bad_source_clients(
    start: Starter, tiny_model: Path, vllm_logs: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, VllmInstance]]:
    """For each BAD_SOURCES case, `netloader serve` of an altered copy of the model and an
    instance whose SOURCE is that server; the instances start together."""
    with contextlib.ExitStack() as stack:
        instances = {}
        for case in BAD_SOURCES:
            altered = _altered_copy(tiny_model, tmp_path_factory.mktemp(case) / "tiny", case)
            server = stack.enter_context(
                serve_directory(altered, vllm_logs / f"checkpoint_{case}.log")
            )
            config = {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": [server.address]}]}
            instances[case] = start(f"ckpt_{case}", tiny_model, config, dtype="float32")
        stack.enter_context(running(*instances.values()))
        yield instances


@pytest.mark.parametrize("case", BAD_SOURCES)
def test_a_bad_checkpoint_source_falls_back_naming_it(
    bad_source_clients: dict[str, VllmInstance], reference32: dict[str, str], case: str
) -> None:
    instance = bad_source_clients[case]
    reasons = fallback_reasons(instance)
    assert len(reasons) == 1 and BAD_SOURCES[case] in reasons[0], instance.netloader_lines()
    assert checkpoint_lines(instance) == []
    assert instance.completions() == reference32
