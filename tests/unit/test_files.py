"""A model directory's other files and the sharding a pull keeps, without a network: what
a server offers, what a client accepts from a hostile one, how both are written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from netloader import NetloaderError, ProtocolError
from netloader import protocol as p
from netloader.checkpoint import (
    CHECKPOINT_WEIGHTS,
    CheckpointWriter,
    checkpoint_identity,
    shards_from_index,
)
from netloader.client.stream import windows
from netloader.files import (
    MODEL_FILES,
    check_files_manifest,
    empty_files,
    model_files,
    write_files,
)
from netloader.manifest import Identity, TensorEntry, build_manifest, config_fingerprint

WEIGHTS = {"a": torch.arange(6.0), "b": torch.ones(2, 3, dtype=torch.bfloat16), "c": torch.zeros(4)}
MANIFEST = build_manifest(Identity("m"), WEIGHTS, chunk_bytes=8)


def _files_manifest(files: dict[str, bytes]) -> p.ManifestMessage:
    tensors = {n: torch.tensor(list(d), dtype=torch.uint8) for n, d in files.items()}
    return p.ManifestMessage(build_manifest(Identity("m"), tensors))


def test_a_directory_offers_its_small_plain_files_but_no_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "empty").write_bytes(b"")
    for skipped in ("model.safetensors", "pytorch_model.bin", "consolidated.pth", ".hidden"):
        (tmp_path / skipped).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "inner.json").write_text("{}")
    (tmp_path / "huge.txt").write_bytes(b"")
    with open(tmp_path / "huge.txt", "r+b") as f:
        f.truncate(MODEL_FILES.file_bytes + 1)  # sparse: no disk used
    (tmp_path / "link.json").symlink_to(tmp_path / "config.json")  # a HF cache's are links
    offered = model_files(tmp_path)
    assert sorted(offered) == ["config.json", "empty", "link.json", "tokenizer.json"]
    assert bytes(offered["tokenizer.json"].numpy()) == b"\x00\x01" * 100
    assert offered["empty"].numel() == 0


@pytest.mark.parametrize(
    "name", ["../evil", "a/b", ".bashrc", "model.safetensors", "x.bin", "..", "a b"]
)
def test_a_client_refuses_files_with_names_that_are_not_plain(name: str) -> None:
    manifest = _files_manifest({"config.json": b"{}", name: b"x"}).manifest
    with pytest.raises(NetloaderError, match="file named"):
        check_files_manifest(manifest)


def test_a_client_refuses_files_that_are_not_bounded_byte_strings() -> None:
    as_floats = build_manifest(Identity("m"), {"config.json": torch.zeros(4)})
    with pytest.raises(NetloaderError, match="not a bounded byte string"):
        check_files_manifest(as_floats)
    many = _files_manifest({f"f{i}": b"x" for i in range(300)}).manifest
    with pytest.raises(NetloaderError, match="300 files"):
        check_files_manifest(many)
    fine = _files_manifest({"config.json": b"{}", "tokenizer.json": b"xyz"}).manifest
    check_files_manifest(fine)
    assert {n: t.numel() for n, t in empty_files(fine).items()} == {
        "config.json": 2,
        "tokenizer.json": 3,
    }


def test_files_are_written_atomically_and_links_are_replaced_not_followed(
    tmp_path: Path,
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").symlink_to(victim)
    data = torch.frombuffer(bytearray(b'{"a": 1}'), dtype=torch.uint8)
    write_files(out, {"config.json": data, "empty": torch.empty(0, dtype=torch.uint8)})
    assert victim.read_text() == "keep me"
    assert not (out / "config.json").is_symlink()
    assert (out / "config.json").read_text() == '{"a": 1}' and (out / "empty").read_bytes() == b""
    assert not list(out.glob(".*partial"))
    with pytest.raises(NetloaderError, match="refusing"):
        write_files(out, {"../x": data})


def test_a_pull_keeps_the_index_sharding(tmp_path: Path) -> None:
    index = json.dumps(
        {"weight_map": {"a": "one.safetensors", "b": "two.safetensors", "c": "one.safetensors"}}
    )
    shards = shards_from_index(index.encode(), MANIFEST)
    with CheckpointWriter(tmp_path, MANIFEST, shards) as writer:
        for name, tensor in WEIGHTS.items():
            writer.tensors[name].copy_(tensor)
        paths = writer.commit()
    assert set(writer.timings) == {"sync", "rename"}  # what `pull -v` logs
    assert sorted(p.name for p in paths) == ["one.safetensors", "two.safetensors"]
    one, two = load_file(tmp_path / "one.safetensors"), load_file(tmp_path / "two.safetensors")
    assert sorted(one) == ["a", "c"] and sorted(two) == ["b"]
    assert torch.equal(one["a"], WEIGHTS["a"]) and torch.equal(two["b"], WEIGHTS["b"])


@pytest.mark.parametrize(
    ("weight_map", "error"),
    [
        ({"a": "../x.safetensors", "b": "x.safetensors", "c": "x.safetensors"}, "names a shard"),
        ({"a": "x.bin", "b": "x.bin", "c": "x.bin"}, "names a shard"),
        ({"a": "x.safetensors", "b": "x.safetensors"}, "does not match the weights"),
        ({"a": "x", "b": "x", "c": "x", "d": "x"}, "does not match the weights"),
        ([], "not a valid index"),
    ],
)
def test_an_index_that_does_not_place_exactly_the_weights_is_refused(
    weight_map: object, error: str
) -> None:
    with pytest.raises(NetloaderError, match=error):
        shards_from_index(json.dumps({"weight_map": weight_map}).encode(), MANIFEST)


def test_a_served_checkpoint_says_what_it_is_and_fingerprints_its_config(
    tmp_path: Path,
) -> None:
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "_name_or_path": "/somewhere"}')
    identity = checkpoint_identity("tiny", tmp_path)
    assert identity.attributes["weights"] == CHECKPOINT_WEIGHTS
    # Where the model came from does not change its fingerprint; its configuration does.
    assert identity.attributes["config"] == config_fingerprint({"hidden_size": 64})
    assert identity.attributes["config"] != config_fingerprint({"hidden_size": 65})
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(NetloaderError, match="JSON object"):
        checkpoint_identity("tiny", tmp_path)
    assert "config" not in checkpoint_identity("tiny", tmp_path / "missing").attributes


def test_get_manifest_names_a_known_part() -> None:
    assert p.GetManifest.decode({}).part is p.Part.WEIGHTS
    assert p.GetManifest.decode({"part": "files"}).part is p.Part.FILES
    with pytest.raises(ProtocolError, match="unknown part"):
        p.GetManifest.decode({"part": "../etc"})


def test_windows_cut_in_order_and_a_large_tensor_is_a_window_of_its_own() -> None:
    entries = [TensorEntry(f"t{i}", "uint8", (n,), n) for i, n in enumerate([3, 3, 10, 1, 1])]
    cut = windows(entries, 6)
    assert [[e.name for e in w] for w in cut] == [["t0", "t1"], ["t2"], ["t3", "t4"]]
    assert windows([], 6) == []
