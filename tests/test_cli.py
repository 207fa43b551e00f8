"""The `netloader` command line, as users run it: real processes end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tensorsets import big, model_like, same_bytes

NETLOADER = str(Path(sys.executable).with_name("netloader"))


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NETLOADER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sharded_checkpoint(tmp_path: Path) -> Path:
    """model_like() split over two files with an index, as large checkpoints are."""
    tensors = {n: t.contiguous() for n, t in model_like().items()}
    names = list(tensors)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, ckpt / file)
        weight_map |= {n: file for n in part}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return ckpt


def serve(ckpt: Path, *extra: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        [NETLOADER, "serve", str(ckpt), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert " on " in line, line + proc.stderr.read() if proc.stderr else ""
    try:
        yield line.rsplit(" on ", 1)[1].strip(), proc
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


@pytest.fixture
def served(sharded_checkpoint: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    yield from serve(sharded_checkpoint, "--model", "tiny")


def test_pull_writes_bit_identical_checkpoint(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address, _ = served
    out = tmp_path / "out"
    result = run("pull", address, "--out", str(out), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "GB/s" in result.stdout
    pulled = load_file(out / "model.safetensors")
    expected = model_like()
    assert sorted(pulled) == sorted(expected)
    assert all(same_bytes(pulled[n], t) for n, t in expected.items())
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]


def test_inspect_text_and_json(served) -> None:  # type: ignore[no-untyped-def]
    address, _ = served
    text = run("inspect", address)
    assert text.returncode == 0
    assert "model tiny  tp 0/1  pp 0/1" in text.stdout
    assert "layers.3.mlp.down  bfloat16" in text.stdout
    as_json = json.loads(run("inspect", address, "--json").stdout)
    assert as_json["identity"]["model"] == "tiny" and len(as_json["tensors"]) == len(model_like())


def test_errors_exit_nonzero_with_one_line(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    address, _ = served
    cases = [
        (
            ("pull", address, "--out", str(tmp_path / "o"), "--model", "other"),
            "serves 'tiny', not 'other'",
        ),
        (("pull", "127.0.0.1:1", "--out", str(tmp_path / "o")), "cannot connect to 127.0.0.1:1"),
        (("inspect", "no-port-here"), "expected 'host:port'"),
        (("serve", str(tmp_path / "missing")), "does not exist"),
    ]
    for args, reason in cases:
        result = run(*args)
        assert result.returncode != 0, args
        assert reason in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_secret_file(sharded_checkpoint: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("hunter2\n")
    for address, _proc in serve(sharded_checkpoint, "--secret-file", str(secret)):
        refused = run("inspect", address)
        assert refused.returncode == 1 and "requires a secret" in refused.stderr
        ok = run("pull", address, "--out", str(tmp_path / "o"), "--secret-file", str(secret))
        assert ok.returncode == 0, ok.stderr
        assert "hunter2" not in ok.stdout + ok.stderr


def test_interrupted_pull_leaves_no_complete_looking_file(tmp_path: Path, proxy) -> None:  # type: ignore[no-untyped-def]
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    save_file(big(), ckpt / "model.safetensors")
    for address, _ in serve(ckpt):
        slow = proxy(address, rate=8 << 20)  # ~8 s for 64 MiB
        out = tmp_path / "out"
        pull = subprocess.Popen(
            [NETLOADER, "pull", slow.address, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 30
        while slow.forwarded < (16 << 20) and time.monotonic() < deadline:
            time.sleep(0.05)
        pull.send_signal(signal.SIGINT)
        pull.wait(timeout=20)
        assert pull.returncode != 0
        assert not (out / "model.safetensors").exists()
        # a later pull still works
        result = run("pull", address, "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert (out / "model.safetensors").exists() and not list(out.glob(".*partial"))
        assert torch.equal(load_file(out / "model.safetensors")["block.3"], big()["block.3"])
    assert os.environ.get("NETLOADER_SECRET") is None
