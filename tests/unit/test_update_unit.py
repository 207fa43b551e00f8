"""Live updates without sockets: versions in identities, manifests and registry records,
a staged update's switch, which copies exactly the changed chunks (column tiles included)
into the live tensors, and what a switched instance relays (`PartOfModel`)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
import torch

from netloader.checkpoint import LocalCheckpoint
from netloader.cli.update import parse_instance
from netloader.client.update import StagedUpdate, UpdateReport, changed_chunks, planned_alike
from netloader.discovery.registry import Group, Record, server_record
from netloader.errors import NetloaderError, SourceUnavailable, UsageError
from netloader.manifest import Identity, Manifest, build_manifest
from netloader.server import PartOfModel
from netloader.testing.models import differing, transformer_like, write_checkpoint


def test_a_stated_version_must_match_and_an_unstated_one_accepts_any() -> None:
    served = Identity("m", version="7")
    assert Identity("m", version="7").differences(served) == []
    assert Identity("m").differences(served) == []
    assert Identity("m", version="8").differences(served) == [
        "version: expected '8', server has '7'"
    ]
    assert Identity("m", version="8").differences(Identity("m")) == [
        "version: expected '8', server has ''"
    ]


def test_the_version_travels_in_the_manifest_and_the_registry_record() -> None:
    tensors = {"w": torch.ones(4)}
    manifest = build_manifest(Identity("m", version="3"), tensors)
    assert Manifest.from_json(manifest.to_json()).identity.version == "3"
    unversioned = build_manifest(Identity("m"), tensors).to_json()
    assert "version" not in unversioned["identity"]
    assert Manifest.from_json(unversioned).identity.version == ""
    record = server_record(Group("m", 1, 1, 0), "127.0.0.1:7000", version="3")
    assert Record.from_json(record.to_json()) == record
    plain = server_record(Group("m", 1, 1, 0), "127.0.0.1:7000")
    assert "version" not in plain.to_json()
    assert Record.from_json(plain.to_json()) == plain
    planted = plain.to_json().replace("}", ',"version":3}')
    assert Record.from_json(planted) is None  # not a string: junk, skipped


def _staged(
    live: dict[str, torch.Tensor], new: dict[str, torch.Tensor], tiles: int
) -> StagedUpdate:
    """What `stage_update` hands over: the new version's manifest, the changed chunks'
    tensors staged whole (only their changed chunks are read)."""
    offered = build_manifest(Identity("m", version="2"), new, 16 << 10, tiles)
    held = build_manifest(Identity("m"), live, 16 << 10, tiles)
    changed = [
        i for i, (a, b) in enumerate(zip(held.digests, offered.digests, strict=True)) if a != b
    ]
    names = offered.tensor_names(changed)
    # Only the changed chunks are pulled: everything else in staging is garbage.
    staging = {n: torch.full_like(new[n], float("nan")) for n in names}
    flats = {n: staging[n].view(-1).view(torch.uint8) for n in names}
    for index in changed:
        for piece in offered.chunks[index].pieces:
            name = offered.tensors[piece.tensor].name
            piece.of(flats[name]).copy_(piece.of(new[name].reshape(-1).view(torch.uint8)))
    report = UpdateReport("m", "2", len(changed), offered.chunk_total, 0, 0, tuple(names), (), 0)
    return StagedUpdate(live, offered, staging, changed, report)


@pytest.mark.parametrize("tiles", [1, 4])
def test_commit_copies_the_changed_chunks_and_nothing_else(tiles: int) -> None:
    old = transformer_like(layers=2)
    new = {n: t.clone() for n, t in old.items()}
    new["layers.1.mlp.down"][3:5, 100:300] += 1  # a few chunks of one matrix (some tiles)
    new["layers.0.norm"][0] = 42.0
    live = {n: t.clone() for n, t in old.items()}
    staged = _staged(live, new, tiles)
    assert set(staged.report.tensors) == {"layers.1.mlp.down", "layers.0.norm"}
    assert staged.report.changed < staged.report.chunk_total
    staged.commit()
    assert not differing(live, new)
    with pytest.raises(UsageError, match="committed or discarded already"):
        staged.commit()


def test_a_discarded_update_leaves_the_live_tensors_as_they_were() -> None:
    old = transformer_like(layers=1)
    new = {n: t + 1 if t.is_floating_point() else t for n, t in old.items()}
    live = {n: t.clone() for n, t in old.items()}
    staged = _staged(live, new, 1)
    staged.discard()
    assert not differing(live, old)
    with pytest.raises(UsageError):
        staged.commit()


def test_part_of_a_model_serves_its_whole_chunks_checked_and_refuses_the_rest() -> None:
    """What a switched instance relays: the chunks made only of the tensors it took (each
    checked against the manifest before it is served), never a chunk with bytes it lacks."""
    model = {
        "a.norm": torch.arange(4, dtype=torch.float32),  # small: a, b.norm share a chunk
        "b.norm": torch.arange(4, dtype=torch.float32) + 4,
        "b.big": torch.arange(64, dtype=torch.float32),  # its own chunks
        "c.norm": torch.ones(4),
    }
    manifest = build_manifest(Identity("m", version="2"), model, chunk_bytes=64)
    taken = set(manifest.tensor_names(manifest.chunks_holding({"b.big"})))
    assert taken == {"b.big"}
    taken = set(manifest.tensor_names(manifest.chunks_holding({"b.norm"})))
    assert taken == {"a.norm", "b.norm"}  # whole chunks: b.norm's neighbour comes along
    part = PartOfModel(
        {name: model[name].clone() for name in taken | {"b.big"}}, manifest, lacking="only b"
    )
    assert part.manifest(0) is manifest
    held = manifest.chunks_holding({"a.norm", "b.norm", "b.big"})
    for number in held:
        part.wait_for(manifest.chunks[number], 0)  # checked: served
    (c_chunk,) = manifest.chunks_holding({"c.norm"})
    assert c_chunk not in held
    with pytest.raises(SourceUnavailable, match=r"only b; it lacks chunk \d+ \('c.norm'\)"):
        part.wait_for(manifest.chunks[c_chunk], 0)


def test_part_of_a_model_refuses_a_chunk_written_since_it_was_verified() -> None:
    tensors = {"w": torch.arange(32, dtype=torch.float32)}
    manifest = build_manifest(Identity("m"), tensors, chunk_bytes=64)
    kept = {"w": tensors["w"].clone()}
    part = PartOfModel(kept, manifest, lacking="-")
    first, second = manifest.chunks[0], manifest.chunks[1]
    part.wait_for(first, 0)
    kept["w"][20] = -1.0  # in the second chunk (16 floats each)
    with pytest.raises(SourceUnavailable, match="changed since it was verified"):
        part.wait_for(second, 0)


def test_an_instance_is_a_url_with_its_netloader_server_optionally() -> None:
    assert parse_instance("http://h:8000") == ("http://h:8000", None)
    assert parse_instance("http://h:8000=127.0.0.1:7001") == ("http://h:8000", "127.0.0.1:7001")
    for bad in ("h:8000", "http://h:8000=nowhere"):
        with pytest.raises(click.BadParameter):
            parse_instance(bad)


def test_a_disk_loaded_models_checkpoint_is_digested_as_the_new_version_is_planned(
    tmp_path: Path,
) -> None:
    """What a live update compares with for an instance that loaded from disk: its files,
    planned as the publisher's manifest (order, chunk size); refused once they changed."""
    v1 = transformer_like()
    directory = write_checkpoint(tmp_path / "ckpt", v1, shards=2).parent
    on_disk = LocalCheckpoint.of(directory)
    assert on_disk is not None and LocalCheckpoint.of(tmp_path / "nothing") is None
    offered = build_manifest(Identity("m", version="2"), dict(reversed(v1.items())), 1 << 16)
    held = on_disk.manifest_like(offered)
    assert planned_alike(held, offered) and changed_chunks(held, offered) == []
    changed = dict(v1)
    changed["layers.2.mlp.up"] = v1["layers.2.mlp.up"] + 1
    newer = build_manifest(offered.identity, {t.name: changed[t.name] for t in offered.tensors},
                           1 << 16)  # fmt: skip
    assert offered.tensor_names(changed_chunks(held, newer)) == ["layers.2.mlp.up"]
    assert on_disk.unchanged() is on_disk
    write_checkpoint(directory, changed, shards=2)  # rewritten: no longer what was loaded
    assert on_disk.unchanged() is None  # (a load it happened during holds nothing known)
    with pytest.raises(NetloaderError, match="changed since this instance loaded them"):
        on_disk.manifest_like(offered)
