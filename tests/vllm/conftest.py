"""Session fixtures for the vLLM end-to-end tests: the vLLM venv (scripts/setup_vllm.sh),
the tiny model (scripts/make_tiny_llama.py, cached in runs/models/), and a copy of it
without weight files.

These tests are marked `vllm`: `pytest -m "not vllm"` deselects them, and so does
NETLOADER_SKIP_VLLM=1 (they are then reported as skipped).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from netloader.testing.models import perturbed_checkpoint
from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import VllmInstance, make_weightless_dir
from support.vllm_checks import Starter, serve_directory

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "runs" / "models"
SETUP_TIMEOUT = 20 * 60


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vllm: end-to-end tests that start real vLLM servers (slow; need ~3 GB disk)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("NETLOADER_SKIP_VLLM") not in (None, "", "0"):
        skip = pytest.mark.skip(reason="NETLOADER_SKIP_VLLM is set")
        for item in items:
            if item.get_closest_marker("vllm"):
                item.add_marker(skip)


def _run(cmd: list[str], what: str, timeout: float) -> str:
    """Run a setup step; its last stdout line is the answer. Fails the test with the tail."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{what} timed out after {timeout:.0f} s: {exc.stderr!s:.3000}")
    if done.returncode != 0 or not done.stdout.strip():
        tail = f"{done.stderr[-4000:]}\n{done.stdout[-1000:]}"
        pytest.fail(f"{what} failed (status {done.returncode}):\n{tail}")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The vLLM venv's python, with this clone installed in it (editable)."""
    return _run(["bash", str(REPO / "scripts" / "setup_vllm.sh")], "setup_vllm.sh", SETUP_TIMEOUT)


@pytest.fixture(scope="session")
def tiny_model(vllm_python: str) -> Path:
    """runs/models/tiny: the trained tiny Llama, bfloat16 checkpoint (built once, cached)."""
    script = str(REPO / "scripts" / "make_tiny_llama.py")
    return Path(_run([vllm_python, script, str(MODELS), "--size", "tiny"], "make_tiny_llama", 900))


@pytest.fixture(scope="session")
def moe_model(vllm_python: str) -> Path:
    """runs/models/tiny-moe: a trained two-layer Qwen3-MoE, 16 experts per layer, top-2,
    the tiny model's tokenizer, bfloat16 checkpoint (built once, cached)."""
    script = str(REPO / "scripts" / "make_tiny_moe.py")
    return Path(_run([vllm_python, script, str(MODELS)], "make_tiny_moe", 900))


@pytest.fixture(scope="session")
def mtp_model(vllm_python: str) -> Path:
    """runs/models/tiny-mtp: a trained two-layer Qwen2 saved as MiMoForCausalLM with one
    multi-token-prediction layer (`model.mtp_layers.0.*`), the tiny model's tokenizer,
    bfloat16 checkpoint (built once, cached): vLLM's speculative method "mtp" drafts with
    that layer, loaded from the same directory."""
    script = str(REPO / "scripts" / "make_tiny_mtp.py")
    return Path(_run([vllm_python, script, str(MODELS)], "make_tiny_mtp", 900))


@pytest.fixture(scope="session")
def draft_model(vllm_python: str) -> Path:
    """runs/models/draft: a one-layer draft for the tiny model, same tokenizer (cached)."""
    script = str(REPO / "scripts" / "make_tiny_llama.py")
    return Path(_run([vllm_python, script, str(MODELS), "--size", "draft"], "draft model", 900))


@pytest.fixture(scope="session")
def w8a8_model(vllm_python: str, tiny_model: Path) -> Path:
    """runs/models/tiny-w8a8: the tiny model quantized W8A8 int8 (compressed-tensors)."""
    script = str(REPO / "scripts" / "make_w8a8.py")
    return Path(
        _run([vllm_python, script, str(tiny_model), str(MODELS / "tiny-w8a8")], "w8a8", 300)
    )


@pytest.fixture(scope="session")
def client_model_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's config and tokenizer files without any weight file."""
    out = make_weightless_dir(tiny_model, tmp_path_factory.mktemp("weightless") / "tiny")
    assert not [f for f in out.iterdir() if "safetensors" in f.name]
    return out


@pytest.fixture(scope="session")
def v2_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Version 2 of the tiny model: its decoder layer 1 fine-tuned (noise added), the
    rest bit-identical (what a live update moves)."""
    return perturbed_checkpoint(tiny_model, tmp_path_factory.mktemp("v2") / "tiny", "layers.1.")


@pytest.fixture(scope="session")
def vllm_logs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where every vLLM instance writes its log (and OUTPUT_PREFIX files)."""
    yield tmp_path_factory.mktemp("vllm")


@pytest.fixture(scope="session")
def start(vllm_python: str, vllm_logs: Path) -> Starter:
    """Starts vLLM instances: `start(name, model_dir, extra_config, **VllmInstance args)`."""
    return Starter(vllm_python, vllm_logs)


@pytest.fixture(scope="session")
def seed32(start: Starter, tiny_model: Path) -> Iterator[VllmInstance]:
    """Loads from disk (its SOURCE lists no source for rank 0), float32, serves; writes
    seed32_0.txt. Shared by the test files: the reference outputs, and a vLLM peer."""
    config = {
        "MODEL": "tiny",
        "SOURCE": [{"device_id": 0, "sources": []}],
        "OUTPUT_PREFIX": start.prefix("seed32"),
    }
    with start("seed32", tiny_model, config, dtype="float32") as seed:
        yield seed


@pytest.fixture(scope="session")
def checkpoint_server(tiny_model: Path, vllm_logs: Path) -> Iterator[ServerProcess]:
    """`netloader serve` of the tiny model's directory: a checkpoint-format source."""
    with serve_directory(tiny_model, vllm_logs / "checkpoint_server.log") as server:
        yield server


@pytest.fixture(scope="session")
def reference32(seed32: VllmInstance) -> dict[str, str]:
    completions = seed32.completions()
    assert len(set(completions.values())) > 1, (
        f"the model does not depend on the prompt: {completions}"
    )
    return completions
