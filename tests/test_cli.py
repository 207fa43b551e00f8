"""The `netloader` command line, as users run it: real processes end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import netloader
from netloader.checkpoint import load_checkpoint
from netloader.testing.certs import self_signed_certificate
from netloader.testing.models import (
    blocks,
    differing,
    same_bytes,
    transformer_like,
    write_checkpoint,
)
from netloader.testing.processes import ServerProcess
from support.servers import NETLOADER, MakeProxy, StartCliServer, run_cli
from support.tensors import empty_like_set, untouched

MODEL_FILES = {
    "config.json": b'{"model_type": "llama", "hidden_size": 64}',
    "tokenizer.json": bytes(range(256)) * 4000,  # larger than a chunk is not needed: binary
    "generation_config.json": b"{}",
    "empty.txt": b"",
}


@pytest.fixture
def sharded_checkpoint(tmp_path: Path) -> Path:
    """transformer_like() split over two files with an index, as large checkpoints are,
    beside a config and a tokenizer."""
    directory = write_checkpoint(tmp_path / "ckpt", transformer_like(), shards=2).parent
    for name, data in MODEL_FILES.items():
        (directory / name).write_bytes(data)
    (directory / "subdir").mkdir()
    (directory / "subdir" / "not-served.txt").write_text("x")
    (directory / ".hidden").write_text("x")
    return directory


@pytest.fixture
def served(sharded_checkpoint: Path, cli_server: StartCliServer) -> ServerProcess:
    return cli_server(sharded_checkpoint, "--model", "tiny")


def test_pull_writes_the_source_directory_as_it_is(
    served: ServerProcess, sharded_checkpoint: Path, tmp_path: Path
) -> None:
    """Same shards (names, and which tensor is in which), same index, same other files."""
    out = tmp_path / "out"
    result = run_cli("pull", served.address, "--out", str(out), "--model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout and "GB/s" in result.stdout
    assert "(2 shards); 5 other files" in result.stdout
    source_files = sorted(
        p.name for p in sharded_checkpoint.iterdir() if p.is_file() and p.name != ".hidden"
    )
    assert sorted(p.name for p in out.iterdir()) == source_files
    for name in source_files:
        if name.endswith(".safetensors"):
            pulled, original = load_file(out / name), load_file(sharded_checkpoint / name)
            assert sorted(pulled) == sorted(original)
            assert all(same_bytes(pulled[n], t) for n, t in original.items())
        else:
            assert (out / name).read_bytes() == (sharded_checkpoint / name).read_bytes()
    pulled_all = load_checkpoint(out)
    assert all(same_bytes(pulled_all[n], t) for n, t in transformer_like().items())


def test_the_api_loads_a_served_checkpoint_by_its_name(
    served: ServerProcess, sharded_checkpoint: Path, tmp_path: Path
) -> None:
    """`netloader.load(dest, [addr], NAME)` against `netloader serve DIR --model NAME`: the
    attributes the server states (weights=checkpoint, its config's fingerprint) are not
    constraints the caller has to copy; the name, the tensors and what the caller states are."""
    expected = transformer_like()
    dest = empty_like_set(expected)
    report = netloader.load(dest, [served.address], "tiny")
    assert not differing(dest, expected) and report.tensors == len(expected)

    def refused(dest: dict[str, torch.Tensor], identity: netloader.Identity | str) -> str:
        with pytest.raises(netloader.ManifestMismatch) as info:
            netloader.load(dest, [served.address], identity)
        assert untouched(dest) and info.value.completed == frozenset()
        return str(info.value)

    assert "model: expected 'other', server has 'tiny' (pass 'tiny' to load" in refused(
        empty_like_set(expected), "other"
    )
    narrower = empty_like_set(expected)
    narrower["embed.weight"] = empty_like_set({"e": torch.zeros(999, 256, dtype=torch.bfloat16)})[
        "e"
    ]
    assert "tensor 'embed.weight': expected bfloat16[999, 256], server has bfloat16[1000, 256]" in (
        refused(narrower, "tiny")
    )
    # A caller that states its config (here: a fine-tune with another hidden size) is held to it.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"model_type": "llama", "hidden_size": 128}')
    message = refused(empty_like_set(expected), netloader.checkpoint_identity("tiny", mine))
    ours = netloader.checkpoint_identity("tiny", sharded_checkpoint).attributes["config"]
    theirs = netloader.checkpoint_identity("tiny", mine).attributes["config"]
    assert f"attribute config: expected {theirs!r}, server has {ours!r}" in message
    # The same config stated explicitly loads.
    dest = empty_like_set(expected)
    netloader.load(
        dest, [served.address], netloader.checkpoint_identity("tiny", sharded_checkpoint)
    )
    assert not differing(dest, expected)


def test_pull_no_weights_fetches_just_the_other_files(
    served: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "empty-node"
    result = run_cli("pull", served.address, "--out", str(out), "--no-weights")
    assert result.returncode == 0, result.stderr
    assert "pulled 5 files" in result.stdout
    expected = {**MODEL_FILES, "model.safetensors.index.json": None}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, data in MODEL_FILES.items():
        assert (out / name).read_bytes() == data


def test_a_single_file_checkpoint_pulls_into_model_safetensors(
    tmp_path: Path, cli_server: StartCliServer
) -> None:
    address = cli_server(write_checkpoint(tmp_path / "one", blocks()).parent).address
    out = tmp_path / "out"
    result = run_cli("pull", address, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["block.3"], blocks()["block.3"])
    nothing_else = run_cli("pull", address, "--out", str(tmp_path / "o2"), "--no-weights")
    assert nothing_else.returncode == 0 and "pulled 0 files" in nothing_else.stdout


def test_a_server_without_files_gives_weights_only_or_a_clear_error(tmp_path: Path) -> None:
    with netloader.serve(blocks(), "m") as server:  # the API serves tensors, no directory
        weights = run_cli("pull", str(server.address), "--out", str(tmp_path / "w"))
        assert weights.returncode == 0, weights.stderr
        assert "weights only" in weights.stderr and "offers no files" in weights.stderr
        assert [p.name for p in (tmp_path / "w").iterdir()] == ["model.safetensors"]
        files = run_cli("pull", str(server.address), "--out", str(tmp_path / "f"), "--no-weights")
        assert files.returncode == 1 and "offers no files" in files.stderr


def test_inspect_text_and_json(served: ServerProcess) -> None:
    text = run_cli("inspect", served.address)
    assert text.returncode == 0
    assert "model tiny  tp 0/1  pp 0/1" in text.stdout
    assert "layers.3.mlp.down  bfloat16" in text.stdout
    as_json = json.loads(run_cli("inspect", served.address, "--json").stdout)
    assert as_json["identity"]["model"] == "tiny"
    assert len(as_json["tensors"]) == len(transformer_like())


def test_errors_exit_nonzero_with_one_line(served: ServerProcess, tmp_path: Path) -> None:
    cases = [
        (
            ("pull", served.address, "--out", str(tmp_path / "o"), "--model", "other"),
            "serves 'tiny', not 'other'",
        ),
        (("pull", "127.0.0.1:1", "--out", str(tmp_path / "o")), "cannot connect to 127.0.0.1:1"),
        (("inspect", "no-port-here"), "expected 'host:port'"),
        (("serve", str(tmp_path / "missing")), "does not exist"),
        (("serve", str(tmp_path / "truncated.safetensors")), "not a readable safetensors file"),
        (("pull", served.address, "--out", str(tmp_path / "o"), "--stall-timeout", "-1"), "STALL"),
        (("pull", served.address, "--out", str(tmp_path / "o"), "--stall-timeout", "nan"), "STALL"),
        (("serve", str(tmp_path / "missing"), "--secret-file", "/dev/null"), "does not exist"),
    ]
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    for args, reason in cases:
        result = run_cli(*args)
        assert result.returncode != 0, args
        assert reason in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_secret_file(sharded_checkpoint: Path, tmp_path: Path, cli_server: StartCliServer) -> None:
    secret = tmp_path / "secret"
    secret.write_text("correct horse battery staple\n")
    address = cli_server(sharded_checkpoint, "--secret-file", str(secret)).address
    refused = run_cli("inspect", address)
    assert refused.returncode == 1 and "requires a secret" in refused.stderr
    ok = run_cli("pull", address, "--out", str(tmp_path / "o"), "--secret-file", str(secret))
    assert ok.returncode == 0, ok.stderr
    assert "correct horse" not in ok.stdout + ok.stderr


def test_interrupted_pull_leaves_no_complete_looking_file(
    tmp_path: Path, proxy: MakeProxy, cli_server: StartCliServer
) -> None:
    ckpt = write_checkpoint(tmp_path / "big", blocks()).parent
    address = cli_server(ckpt).address
    # The proxy stops forwarding after 16 MiB of the 64: the pull is interrupted mid-way
    # however fast or slow this machine is at the moment.
    slow = proxy(address, freeze_after=16 << 20)
    out = tmp_path / "out"
    pull = subprocess.Popen(
        [NETLOADER, "pull", slow.address, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while not slow.frozen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.frozen
    pull.send_signal(signal.SIGINT)
    pull.wait(timeout=20)
    assert pull.returncode != 0
    assert not (out / "model.safetensors").exists()
    # a later pull still works
    result = run_cli("pull", address, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert (out / "model.safetensors").exists() and not list(out.glob(".*partial"))
    assert torch.equal(load_file(out / "model.safetensors")["block.3"], blocks()["block.3"])
    assert os.environ.get("NETLOADER_SECRET") is None


def test_a_port_in_use_is_one_line_and_exit_1_every_time(
    served: ServerProcess, sharded_checkpoint: Path
) -> None:
    """The digest thread starts only once listening, so a failed start never aborts."""
    for _ in range(6):
        result = run_cli("serve", str(sharded_checkpoint), "--listen", served.address)
        assert result.returncode == 1, result.stderr
        assert "Address already in use" in result.stderr and "Traceback" not in result.stderr


def test_a_mismatched_tls_key_is_one_line_and_exit_1_every_time(
    sharded_checkpoint: Path, tmp_path: Path
) -> None:
    cert, _ = self_signed_certificate(tmp_path / "a", ["127.0.0.1"])
    _, other_key = self_signed_certificate(tmp_path / "b", ["127.0.0.1"])
    for _ in range(6):
        result = run_cli(
            "serve", str(sharded_checkpoint), "--tls-cert", str(cert), "--tls-key", str(other_key)
        )
        assert result.returncode == 1, result.stderr
        assert "TLS_CERT" in result.stderr and "Traceback" not in result.stderr


def test_sigterm_during_a_pull_removes_the_partial_file(
    tmp_path: Path, proxy: MakeProxy, cli_server: StartCliServer
) -> None:
    address = cli_server(write_checkpoint(tmp_path / "big", blocks()).parent).address
    slow = proxy(address, freeze_after=8 << 20)  # the pull cannot finish before the signal
    out = tmp_path / "out"
    pull = subprocess.Popen([NETLOADER, "pull", slow.address, "--out", str(out)], text=True)
    deadline = time.monotonic() + 30
    while not slow.frozen and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(out.glob(".model.safetensors.*.partial"))
    pull.terminate()
    assert pull.wait(timeout=20) != 0
    assert list(out.iterdir()) == []


def test_secret_makes_a_strong_private_secret(tmp_path: Path) -> None:
    printed = run_cli("secret")
    assert printed.returncode == 0 and len(printed.stdout.strip()) >= 40
    result = run_cli("secret", str(tmp_path / "key"))
    assert result.returncode == 0
    assert (tmp_path / "key").stat().st_mode & 0o777 == 0o600
    again = run_cli("secret", str(tmp_path / "key"))
    assert again.returncode == 1 and "File exists" in again.stderr


def test_the_commands_that_move_no_tensors_start_without_torch() -> None:
    """`netloader update`, `peers` and `secret` (what a trainer's box or an operator runs,
    often on a machine busy with inference) do not import torch: its import alone can take
    longer than the command. The others import it when they run."""
    probe = (
        "import sys\n"
        "from netloader.cli import main\n"
        "for name in ('update', 'peers', 'secret', 'inspect'):\n"
        "    main.get_command(None, name)\n"
        "main(['update', '--help'], standalone_mode=False)\n"
        "main(['secret'], standalone_mode=False)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "main.get_command(None, 'pull')\n"
        "assert 'torch' in sys.modules\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--registry" in done.stdout
