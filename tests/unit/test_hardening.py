"""Hostile input that needs no network to show: wave records that are not files, manifests
that would cost memory or disk before any data, output directories with planted links,
checkpoint indexes pointing elsewhere, weak secrets, and per-client copies."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from netloader import NetloaderError, ProtocolError, UsageError
from netloader import protocol as p
from netloader.checkpoint import CheckpointWriter, checkpoint_files
from netloader.discovery.wave import Wave
from netloader.manifest import Identity, Manifest, TensorEntry, build_manifest
from netloader.server.holdings import LoadedTensors
from netloader.settings import Timeouts, new_secret, resolve_secret

MANIFEST = build_manifest(Identity("m"), {"a": torch.arange(10.0)}, chunk_bytes=16)


def test_wave_records_that_are_not_small_regular_files_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "seed-b-0.txt")  # reading it would block forever
    (tmp_path / "seed-c-0.txt").write_text("x" * 10_000)
    (tmp_path / "seed-d-0.txt").write_bytes(b"\xff\xfe")
    (tmp_path / "seed-e-0.txt").write_text("10.0.0.1:7000\n")
    started = time.monotonic()
    assert Wave(tmp_path).seeds() == ["10.0.0.1:7000"]
    assert time.monotonic() - started < 5


def test_a_failed_member_leaves_the_wave(tmp_path: Path) -> None:
    wave = Wave(tmp_path)
    first, second = wave.join("10.0.0.1:7000"), wave.join("10.0.0.2:7000")
    wave.leave(first)
    assert wave.member(first) is None and wave.sources(second) == []


def test_a_manifest_body_of_nested_containers_is_refused_before_parsing() -> None:
    """256 MiB of "{}," would be 85 million dicts; refused from a byte count instead."""
    client = p.ClientSession(None)
    client.phase = p.Phase.MANIFEST  # as after GET_MANIFEST
    client.expect_manifest(tensors=3)  # room for 4 x 4096 tensors: 49,000 containers
    body = b'{"x":[' + b"{}," * 100_000 + b"{}]}"
    client.receive_data(p.HEADER.pack(p.MAGIC, p.MsgType.MANIFEST, len(body)) + body)
    with pytest.raises(ProtocolError, match="arrays/objects"):
        client.next_event()


def test_a_fetch_is_bounded_by_the_model_it_names() -> None:
    server = p.ServerSession(None)
    server.phase = p.Phase.READY
    server.expect_fetches(chunks=3)
    server.receive_data(p.HEADER.pack(p.MAGIC, p.MsgType.FETCH, 64 << 20))
    with pytest.raises(ProtocolError, match="at most"):
        server.next_event()


def test_chunks_larger_than_the_bound_are_refused() -> None:
    obj = json.loads(json.dumps(MANIFEST.to_json()))
    obj["chunk_bytes"] = 4 << 30
    with pytest.raises(ProtocolError, match="chunk_bytes"):
        Manifest.from_json(obj)


def _manifest(*entries: TensorEntry) -> Manifest:
    return Manifest(Identity("m"), entries)


def test_a_model_larger_than_the_disk_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    huge = [TensorEntry(f"t{i}", "uint8", (1 << 44,), 1 << 44) for i in range(4)]
    with pytest.raises(NetloaderError, match="bytes free"):
        CheckpointWriter(tmp_path, _manifest(*huge))
    assert list(tmp_path.iterdir()) == []


def test_a_planted_link_in_the_output_directory_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".model.safetensors.partial").symlink_to(victim)
    with CheckpointWriter(out, MANIFEST) as writer:
        writer.tensors["a"].copy_(torch.arange(10.0))
        (path,) = writer.commit()
    assert victim.read_text() == "keep me"
    assert (out / ".model.safetensors.partial").is_symlink()  # untouched too
    assert path.stat().st_size > 40 and not list(out.glob(".model.safetensors.*.partial"))


def test_a_tensor_named_like_safetensors_metadata_is_refused(tmp_path: Path) -> None:
    meta = _manifest(TensorEntry("__metadata__", "uint8", (1,), 1))
    with pytest.raises(NetloaderError, match="__metadata__"):
        CheckpointWriter(tmp_path, meta)


def test_an_index_naming_files_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../../etc/passwd"}})
    )
    with pytest.raises(NetloaderError, match="outside"):
        checkpoint_files(tmp_path)


def test_weak_secrets_are_refused_and_a_good_one_is_easy_to_make() -> None:
    for weak in ("hunter2024", "aaaaaaaaaaaaaaaaaaaa", ""):
        with pytest.raises(UsageError):
            resolve_secret(weak)
    assert resolve_secret(new_secret()) is not None


@pytest.mark.parametrize("bad", [-1, 0, float("nan"), True])
def test_timeouts_must_be_positive_numbers(bad: float) -> None:
    with pytest.raises(UsageError):
        Timeouts(stall=bad)


def test_a_non_contiguous_tensor_is_copied_once_for_every_client() -> None:
    transposed = torch.randn(64, 48).t()
    holdings = LoadedTensors({"t": transposed}, Identity("m"))
    holdings.manifest(timeout=10)
    first, second = holdings.host(0), holdings.host(0)
    assert first.address == second.address == first.flat.data_ptr()
    assert torch.equal(first.flat.view(torch.float32), transposed.contiguous().reshape(-1))


def test_an_index_may_name_shards_that_are_links_elsewhere(tmp_path: Path) -> None:
    """As in a Hugging Face cache: snapshot files link into a blob store elsewhere."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "abc").write_bytes(b"")
    (snapshot / "model-1.safetensors").symlink_to(blobs / "abc")
    (snapshot / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-1.safetensors"}})
    )
    assert checkpoint_files(snapshot) == [snapshot / "model-1.safetensors"]
    for bad in ("/etc/passwd", "sub/../../x.safetensors"):
        (snapshot / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"a": bad}})
        )
        with pytest.raises(NetloaderError, match="outside"):
            checkpoint_files(snapshot)
