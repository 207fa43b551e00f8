"""The verifying sink: bytes land in the destination, and count only if their digest
matches the manifest's."""

from __future__ import annotations

import pytest
import torch

from netloader import IntegrityError
from netloader.client import VerifyingSink
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
