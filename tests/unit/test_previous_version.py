"""Serving the previous version after a live update, without sockets: GET_MANIFEST names the
version a client wants, `choose_weights` picks what a server with a kept version offers,
and `keep_through_switch` keeps a complete version servable while a switch writes the
live tensors in place (cloning exactly those it writes, refusing any other change)."""

from __future__ import annotations

import pytest
import torch

from netloader import protocol as p
from netloader.errors import ProtocolError, SourceUnavailable
from netloader.manifest import Identity, build_manifest
from netloader.server import LoadedTensors, PartOfModel
from netloader.server.holdings import keep_through_switch
from netloader.server.server import choose_weights
from netloader.tensors import flat_bytes
from netloader.testing.models import transformer_like

CHUNK = 16 << 10


def test_get_manifest_names_a_version_and_refuses_junk() -> None:
    asked = p.GetManifest(p.Part.WEIGHTS, "2")
    assert asked.body() == {"part": "weights", "version": "2"}
    assert p.GetManifest.decode(asked.body()) == asked
    assert p.GetManifest().body() == {"part": "weights"}  # unchanged for any version
    assert p.GetManifest.decode({}).version == ""
    for junk in (2, None, "v" * 2000):
        with pytest.raises(ProtocolError, match="version"):
            p.GetManifest.decode({"part": "weights", "version": junk})


def _holdings(version: str, tensors: dict[str, torch.Tensor]) -> LoadedTensors:
    identity = Identity("m", version=version)
    return LoadedTensors(tensors, identity, manifest=build_manifest(identity, tensors, CHUNK))


def test_choose_weights_offers_the_kept_version_to_whoever_can_use_it() -> None:
    v1 = _holdings("1", transformer_like())
    v2_whole = _holdings("2", transformer_like())
    one = next(iter(transformer_like()))
    manifest_v2 = v2_whole.manifest(0)
    v2_delta = PartOfModel({one: transformer_like()[one]}, manifest_v2, lacking="delta only")
    assert not v2_delta.complete and v2_whole.complete and v1.complete
    # Nothing kept: the current, whatever is asked (the client checks the version).
    assert choose_weights("1", v2_delta, None) is v2_delta
    # A delta is current: its version gets it; the kept one's version, or none, the kept.
    assert choose_weights("2", v2_delta, v1) is v2_delta
    assert choose_weights("1", v2_delta, v1) is v1
    assert choose_weights("", v2_delta, v1) is v1
    assert choose_weights("3", v2_delta, v1) is v2_delta  # then refused as version 2
    # A complete current version: it, unless the kept one's version is asked for.
    assert choose_weights("", v2_whole, v1) is v2_whole
    assert choose_weights("1", v2_whole, v1) is v1


def test_keep_through_switch_clones_what_the_switch_writes_and_refuses_other_changes() -> None:
    live = transformer_like()
    served = _holdings("1", live)
    names = list(live)
    written, shared = names[0], names[1]
    before = {name: t.clone() for name, t in live.items()}
    kept = keep_through_switch(served, {live[written].untyped_storage().data_ptr()})
    assert kept is not None and kept.complete
    assert kept.manifest(0) is served.manifest(0)
    assert kept.tensors[written].data_ptr() != live[written].data_ptr()  # cloned
    assert kept.tensors[shared].data_ptr() == live[shared].data_ptr()  # served as it is
    # The switch writes the one it said it would, and (unforeseen) another one.
    live[written].add_(1.0)
    live[shared].add_(1.0)
    manifest = kept.manifest(0)
    for chunk in manifest.chunks:
        pieces = {manifest.tensors[piece.tensor].name for piece in chunk.pieces}
        if shared in pieces:
            with pytest.raises(SourceUnavailable, match="changed since it was verified"):
                kept.wait_for(chunk, 0)
        else:
            kept.wait_for(chunk, 0)  # checked: the version it had
    assert torch.equal(flat_bytes(kept.tensors[written]), flat_bytes(before[written]))


def test_only_a_complete_serving_version_is_kept() -> None:
    tensors = transformer_like()
    assert keep_through_switch(_holdings("1", tensors), set()) is not None
    unavailable = LoadedTensors(tensors, Identity("m"), unavailable="post-processing changed it")
    assert keep_through_switch(unavailable, set()) is None
    one = next(iter(tensors))
    delta = PartOfModel({one: tensors[one]}, _holdings("1", tensors).manifest(0), lacking="x")
    assert keep_through_switch(delta, set()) is None


def test_the_checkpoint_part_is_asked_for_by_version() -> None:
    asked = p.GetManifest(p.Part.CHECKPOINT, "1")
    assert asked.body() == {"part": "checkpoint", "version": "1"}
    assert p.GetManifest.decode(asked.body()) == asked
