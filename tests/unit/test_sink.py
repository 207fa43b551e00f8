"""The verifying sink: bytes land in the destination, and count only if their digest
matches the manifest's."""

from __future__ import annotations

import pytest
import torch

from netloader import IntegrityError
from netloader.client import VerifyingSink
from netloader.client import sink as sink_module
from netloader.errors import TransferTimeout
from netloader.manifest import Chunk, Identity, build_manifest
from netloader.tensors import byte_view

SOURCE = {"w": torch.arange(40, dtype=torch.float32), "t": torch.randn(8, 6).t()}
MANIFEST = build_manifest(Identity("m"), SOURCE, chunk_bytes=64)


def deliver(sink: VerifyingSink, chunk: Chunk, data: bytes) -> None:
    byte_view(sink.destination(chunk))[:] = data
    sink.received(chunk, source="peer:1")


def source_bytes(chunk: Chunk) -> bytes:
    tensor = SOURCE[MANIFEST.tensors[chunk.tensor].name].contiguous()
    return bytes(byte_view(tensor.reshape(-1).view(torch.uint8)))[
        chunk.offset : chunk.offset + chunk.length
    ]


def test_chunks_land_in_place_and_staged_tensors_are_copied_when_complete() -> None:
    dest = {"w": torch.zeros(40), "t": torch.zeros(8, 6).t()}  # "t" is not contiguous: staged
    arrived: list[Chunk] = []
    progress: list[int] = []
    sink = VerifyingSink(MANIFEST, dest, progress=progress.append, verified=arrived.append)
    for chunk in MANIFEST.chunks():
        deliver(sink, chunk, source_bytes(chunk))
    assert torch.equal(dest["w"], SOURCE["w"]) and torch.equal(dest["t"], SOURCE["t"])
    assert sorted(sink.completed()) == ["t", "w"]
    assert sum(progress) == sink.bytes == MANIFEST.total_bytes
    assert len(arrived) == sum(1 for _ in MANIFEST.chunks())


def test_a_corrupt_chunk_is_rejected_and_names_its_source() -> None:
    dest = {"w": torch.zeros(40), "t": torch.zeros(6, 8)}
    sink = VerifyingSink(MANIFEST, dest)
    chunk = MANIFEST.chunk(0, 1)
    bad = bytearray(source_bytes(chunk))
    bad[0] ^= 1
    with pytest.raises(IntegrityError, match="'w' chunk 1 from peer:1: digest mismatch") as info:
        deliver(sink, chunk, bytes(bad))
    assert info.value.source == "peer:1"
    assert not sink.is_done(chunk) and sink.completed() == []


def test_a_digest_computed_on_the_way_is_trusted_only_if_it_matches() -> None:
    sink = VerifyingSink(MANIFEST, {"w": torch.zeros(40), "t": torch.zeros(6, 8)})
    chunk = MANIFEST.chunk(0, 0)
    with pytest.raises(IntegrityError):
        sink.received(chunk, "0" * 32)
    sink.received(chunk, MANIFEST.tensors[0].digests[0])
    assert sink.is_done(chunk)


# The device ring, exercised with host tensors routed through it (no GPU here): the logic
# (slots, verify before copy, reuse) is the same; the copy is synchronous on the CPU.
BIG = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.randn(300)}
BIG_MANIFEST = build_manifest(Identity("m"), BIG, chunk_bytes=256)


def big_bytes(chunk: Chunk) -> bytes:
    tensor = BIG[BIG_MANIFEST.tensors[chunk.tensor].name]
    return bytes(byte_view(tensor.view(torch.uint8)))[chunk.offset : chunk.offset + chunk.length]


def ringed_sink() -> tuple[VerifyingSink, dict[str, torch.Tensor]]:
    dest = {name: torch.zeros_like(t) for name, t in BIG.items()}
    return VerifyingSink(BIG_MANIFEST, dest, ringed=lambda t: True), dest


def test_ringed_chunks_reach_the_tensor_through_a_few_slots() -> None:
    sink, dest = ringed_sink()
    assert sink.ring is not None and not sink.views  # no whole-tensor staging
    chunks = list(BIG_MANIFEST.chunks())
    assert len(chunks) > 2 * sink_module.RING_SLOTS
    slots = set()
    for chunk in reversed(chunks):  # any order
        slots.add(sink.destination(chunk).data_ptr())
        byte_view(sink.destination(chunk))[:] = big_bytes(chunk)  # same slot when asked again
        sink.received(chunk, source="peer:1")
    sink.settle()
    assert len(slots) <= sink_module.RING_SLOTS  # host memory bounded by the ring
    assert all(torch.equal(dest[n], t) for n, t in BIG.items())
    assert sorted(sink.completed()) == ["a", "b"]


def test_a_corrupt_ringed_chunk_never_reaches_the_tensor() -> None:
    sink, dest = ringed_sink()
    chunk = next(iter(BIG_MANIFEST.chunks()))
    bad = bytearray(big_bytes(chunk))
    bad[7] ^= 0xFF
    byte_view(sink.destination(chunk))[:] = bytes(bad)
    with pytest.raises(IntegrityError, match="digest mismatch"):
        sink.received(chunk, source="peer:1")
    assert not dest["a"].any()  # checked before the copy: nothing was written
    for chunk in BIG_MANIFEST.chunks():  # its slot went back: every chunk still fits
        deliver(sink, chunk, big_bytes(chunk))
    assert all(torch.equal(dest[n], t) for n, t in BIG.items())


def test_a_full_ring_is_a_timeout_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_module, "RING_WAIT", 0.05)
    sink, _ = ringed_sink()
    chunks = iter(BIG_MANIFEST.chunks())
    for _ in range(sink_module.RING_SLOTS):  # in flight, never finished
        sink.destination(next(chunks))
    with pytest.raises(TransferTimeout, match="no host buffer freed"):
        sink.destination(next(chunks))
