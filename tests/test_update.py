"""Live updates over real sockets: a model holding version 1 switches in place to version
2, pulling only the chunks that changed; an instance that updated serves the new version
to the next (relay); and a corrupted byte, a publisher killed mid-update, another version
or other tensors, or too little staging memory all leave the live model exactly as it
was, with the reason in the error."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import netloader
from netloader import (
    Identity,
    IntegrityError,
    ManifestMismatch,
    NetloaderConfig,
    SourceUnavailable,
    Timeouts,
    TransferError,
    UsageError,
    metrics,
)
from netloader.checkpoint import CHECKPOINT_WEIGHTS
from netloader.manifest import build_manifest
from netloader.protocol import Part
from netloader.testing.models import differing, transformer_like, write_checkpoint
from support.servers import MakeProxy, StartCliServer, run_cli

CHUNK = 64 << 10
CHANGED = "layers.2.mlp.up"  # one layer's matrix: 512 KiB, 8 chunks


def version_2(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Version 1 with one matrix fine-tuned."""
    new = {name: t.clone() for name, t in old.items()}
    new[CHANGED] += 0.5
    return new


@pytest.fixture
def v1() -> dict[str, torch.Tensor]:
    return transformer_like()


@pytest.fixture
def publisher(v1: dict[str, torch.Tensor]) -> Iterator[netloader.Server]:
    with netloader.publish(version_2(v1), "m", version=2, chunk_bytes=CHUNK) as server:
        yield server


def checkpoint_manifest(tensors: dict[str, torch.Tensor], version: str) -> netloader.Manifest:
    """The manifest of these tensors served as a checkpoint of `version`."""
    identity = Identity("m", attributes={"weights": CHECKPOINT_WEIGHTS}, version=version)
    return build_manifest(identity, tensors, CHUNK)


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def copy_of(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.clone() for name, t in tensors.items()}


def test_an_update_moves_only_the_changed_layer_and_switches_in_place(
    publisher: netloader.Server, v1: dict[str, torch.Tensor]
) -> None:
    live = copy_of(v1)
    addresses = {name: t.data_ptr() for name, t in live.items()}
    pauses: list[str] = []

    class Paused:
        def __enter__(self) -> None:
            pauses.append("pause")

        def __exit__(self, *_: object) -> None:
            pauses.append("resume")

    ok_before = _sample("netloader_updates_finished_total", outcome="ok")
    report = netloader.update(live, [str(publisher.address)], "m", version=2, paused=Paused)
    assert not differing(live, version_2(v1))
    assert _sample("netloader_model_version", model="m") == 2
    assert _sample("netloader_updates_finished_total", outcome="ok") == ok_before + 1
    assert {name: t.data_ptr() for name, t in live.items()} == addresses  # in place
    assert pauses == ["pause", "resume"]
    assert report.tensors == (CHANGED,)
    assert report.bytes == v1[CHANGED].nbytes == 8 * CHUNK  # the delta, nothing else
    assert report.changed == 8 and report.chunk_total > 8
    assert report.version == "2" and "8 of" in report.summary()
    # Already at version 2: nothing moves.
    again = netloader.update(live, [str(publisher.address)], "m", version=2)
    assert again.bytes == 0 and again.changed == 0


def test_an_updated_instance_serves_the_new_version_to_the_next(
    publisher: netloader.Server, v1: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    first, second = copy_of(v1), copy_of(v1)
    with netloader.serve(first, "m", chunk_bytes=CHUNK, version=1) as serving:
        assert serving.manifest(timeout=30).identity.version == "1"
        inspected = run_cli("inspect", str(serving.address))
        assert "model m  tp 0/1  pp 0/1  version 1" in inspected.stdout, inspected.stderr
        netloader.update(first, [str(publisher.address)], "m", version=2, server=serving)
        assert serving.manifest().identity.version == "2"
        report = netloader.update(second, [str(serving.address)], "m", version=2)
        # It goes on serving version 1 to a client that asks for it (the changed tensor
        # was copied before the switch), and version 2 to any other.
        for asked, expected in ((Identity("m", version="1"), v1), ("m", version_2(v1))):
            fresh = {name: torch.empty_like(t) for name, t in v1.items()}
            netloader.load(fresh, [str(serving.address)], asked)
            assert not differing(fresh, expected), asked
        third = copy_of(v1)
        netloader.update(third, [str(serving.address)], "m", version=1)  # nothing moves
        assert not differing(third, v1)
        # The command line asks for it too.
        address = str(serving.address)
        inspected = run_cli("inspect", address, "--version", "1")
        assert "version 1" in inspected.stdout, inspected.stderr
        pulled = run_cli("pull", address, "--version", "1", "--out", str(tmp_path / "v1"))
        assert pulled.returncode == 0, pulled.stderr
        assert not differing(load_file(tmp_path / "v1" / "model.safetensors"), v1)
        refused = run_cli("pull", address, "--version", "3", "--out", str(tmp_path / "v3"))
        assert refused.returncode == 1 and "serves version '2', not '3'" in refused.stderr
    assert report.sources == (str(serving.address),) and report.bytes == v1[CHANGED].nbytes
    assert not differing(second, version_2(v1))
    # Told not to keep it, it serves only version 2.
    with netloader.serve(copy_of(v1), "m", chunk_bytes=CHUNK, version=1) as serving:
        netloader.update(
            serving.holdings.tensors, [str(publisher.address)], "m", version=2, server=serving,
            keep_previous=False,
        )  # fmt: skip
        with pytest.raises(ManifestMismatch, match="version: expected '1', server has '2'"):
            netloader.load(copy_of(v1), [str(serving.address)], Identity("m", version="1"))


def test_a_flipped_byte_is_rejected_and_the_model_keeps_its_version(
    publisher: netloader.Server, v1: dict[str, torch.Tensor], proxy: MakeProxy
) -> None:
    bad = proxy(str(publisher.address), flip_at=200_000)  # inside the changed chunks
    live = copy_of(v1)
    with pytest.raises(IntegrityError, match="digest"):
        netloader.update(live, [bad.address], "m", version=2)
    assert not differing(live, v1)


def test_another_version_other_tensors_or_too_little_staging_leave_the_model_as_it_was(
    publisher: netloader.Server, v1: dict[str, torch.Tensor]
) -> None:
    live = copy_of(v1)
    source = [str(publisher.address)]
    with pytest.raises(ManifestMismatch, match="version: expected '3', server has '2'"):
        netloader.update(live, source, "m", version=3)
    with pytest.raises(ManifestMismatch, match="model: expected 'other'"):
        netloader.update(live, source, "other")
    wider = {**live, "embed.weight": torch.zeros(1001, 256, dtype=torch.bfloat16)}
    with pytest.raises(ManifestMismatch, match=r"embed\.weight"):
        netloader.update(wider, source, "m")
    with pytest.raises(UsageError, match="more than the staging limit of 1000 bytes"):
        netloader.update(live, source, "m", max_staging_bytes=1000)
    assert not differing(live, v1)


def test_a_publisher_killed_mid_update_leaves_the_model_as_it_was(
    cli_server: StartCliServer, v1: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    """A trainer's retrained checkpoint (every tensor changed) served by `netloader serve
    --version 2` at 10 MB/s, SIGKILLed while the update is a third of the way through."""
    retrained = {name: t + 0.5 for name, t in v1.items()}
    write_checkpoint(tmp_path / "v2", retrained)
    served = cli_server(tmp_path / "v2", "--model", "m", "--version", "2", "--send-rate", "1e7")
    live = copy_of(v1)
    killer = threading.Timer(0.2, served.proc.send_signal, (signal.SIGKILL,))
    killer.start()
    try:
        with pytest.raises(TransferError) as caught:
            netloader.update(live, [served.address], "m", version=2, timeouts=Timeouts(stall=5))
    finally:
        killer.cancel()
    assert served.proc.wait(timeout=10) == -signal.SIGKILL
    assert served.address in str(caught.value)
    assert not differing(live, v1)


def test_a_rank_that_switched_relays_the_delta_it_took_and_keeps_serving_what_it_had(
    publisher: netloader.Server, v1: dict[str, torch.Tensor]
) -> None:
    """What an engine's rank does around a live update (`ranks.Member`): before the switch
    it keeps the version its server offers safe from the switch; after it, the server
    serves the tensors it took of the new version under that version's whole manifest (an
    instance still on version 1 updates from it alone, a client wanting version 2 whole
    is told what it holds) and version 1, checked, to a client asking for it or for any
    complete model. Throughout, an instance that loads version 1 from it learns which
    checkpoint that is (`checkpoint_of_peer`), as it must to take live updates itself."""
    from netloader.ranks import Member, checkpoint_of_peer

    version_2_manifest = publisher.manifest(timeout=30)
    taken = {CHANGED: version_2(v1)[CHANGED]}  # as a rank stages it
    rank = Member(0)
    config = NetloaderConfig.load({})
    with netloader.serve(copy_of(v1), "m", chunk_bytes=CHUNK, version=1) as serving:
        rank.attach(serving)
        serving.manifest(timeout=30)  # serving: its digests are computed
        rank.checkpoint = checkpoint_v1 = checkpoint_manifest(v1, "1")  # as if it loaded it
        rank.offer_checkpoint()
        peer_loaded = netloader.load(copy_of(v1), [str(serving.address)], "m")
        assert peer_loaded.version == "1"
        assert checkpoint_of_peer(config, peer_loaded) == checkpoint_v1
        model = serving.holdings.tensors  # what it serves is the model's own tensors
        kept = rank.keep_serving({model[CHANGED].untyped_storage().data_ptr()})
        assert kept is not None
        model[CHANGED].copy_(taken[CHANGED])  # the switch, in place
        rank.switched(taken, version_2_manifest, checkpoint_v1, kept=kept)
        assert rank.checkpoint is version_2_manifest and rank.serving is kept.tensors
        assert checkpoint_of_peer(config, peer_loaded) == checkpoint_v1  # kept with it
        assert serving.manifest().identity.version == "2"
        behind = copy_of(v1)
        report = netloader.update(behind, [str(serving.address)], "m", version=2)
        assert report.sources == (str(serving.address),) and report.bytes == v1[CHANGED].nbytes
        assert not differing(behind, version_2(v1))
        with pytest.raises(TransferError, match="holds only what changed from version 1"):
            netloader.load(copy_of(v1), [str(serving.address)], Identity("m", version="2"))
        for asked in (Identity("m", version="1"), "m"):
            fresh = {name: torch.empty_like(t) for name, t in v1.items()}
            netloader.load(fresh, [str(serving.address)], asked)
            assert not differing(fresh, v1), asked
        # A second switch (to version 3) keeps version 1, and its checkpoint, served.
        version_3 = {**version_2(v1), CHANGED: taken[CHANGED] + 0.25}
        again = rank.keep_serving({model[CHANGED].untyped_storage().data_ptr()})
        assert again is not None
        model[CHANGED].copy_(version_3[CHANGED])
        three = checkpoint_manifest(version_3, "3")
        rank.switched({CHANGED: version_3[CHANGED]}, three, version_2_manifest, kept=again)
        assert checkpoint_of_peer(config, peer_loaded) == checkpoint_v1
        fresh = {name: torch.empty_like(t) for name, t in v1.items()}
        netloader.load(fresh, [str(serving.address)], "m")
        assert not differing(fresh, v1)


def test_a_rank_told_not_to_keep_what_it_had_leaves_the_registry_and_serves_the_delta(
    publisher: netloader.Server, v1: dict[str, torch.Tensor]
) -> None:
    from netloader.ranks import Member

    taken = {CHANGED: version_2(v1)[CHANGED]}
    rank, withdrawn = Member(0), []
    with netloader.serve(copy_of(v1), "m", chunk_bytes=CHUNK, version=1) as serving:
        serving.at_close(lambda: withdrawn.append("registry record"))
        rank.attach(serving)
        rank.checkpoint = checkpoint_v1 = checkpoint_manifest(v1, "1")
        rank.offer_checkpoint()
        rank.switched(taken, publisher.manifest(timeout=30), checkpoint_v1, kept=None)
        assert withdrawn == ["registry record"] and rank.serving is None
        with pytest.raises(SourceUnavailable, match="this server offers no checkpoint"):
            netloader.Client([str(serving.address)]).manifest(Part.CHECKPOINT, version="1")
        with pytest.raises(TransferError, match="holds only what changed from version 1"):
            netloader.load(copy_of(v1), [str(serving.address)], "m")
        with pytest.raises(TransferError, match="expected '1', server has '2'"):
            netloader.load(copy_of(v1), [str(serving.address)], Identity("m", version="1"))
