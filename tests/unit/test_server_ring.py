"""The server stages chunks of device tensors through a small ring of host buffers: the
bytes a sender gets are the chunk's, host memory stays at the ring's size, and no device
tensor is copied whole. Host tensors stand in for device ones here (the `ringed`
predicate); tests/gpu runs the same path with CUDA tensors."""

from __future__ import annotations

import threading

import pytest
import torch

from netloader.errors import TransferTimeout
from netloader.manifest import Chunk, Identity, build_manifest
from netloader.server import holdings as holdings_module
from netloader.server.conversation import HeldChunks
from netloader.server.holdings import LoadedTensors

TENSORS = {
    "big": torch.randn(256, 64),  # 64 KiB: chunks of its own, "on the device"
    "small": torch.randn(5),  # coalesced with the next, "on the device"
    "host": torch.arange(7, dtype=torch.int16),  # a host tensor in the same chunk
    "tiled": torch.randn(64, 32),  # column tiles: strided pieces, "on the device"
}
DEVICE = {"big", "small", "tiled"}


def fake_device(tensor: torch.Tensor) -> bool:
    return any(tensor is TENSORS[name] for name in DEVICE)


def expected(chunk: Chunk, names: list[str]) -> bytes:
    out = b""
    for piece in chunk.pieces:
        flat = TENSORS[names[piece.tensor]].reshape(-1).view(torch.uint8)
        out += piece.of(flat).contiguous().numpy().tobytes()
    return out


@pytest.fixture
def held() -> HeldChunks:
    manifest = build_manifest(Identity("m"), TENSORS, chunk_bytes=4096, column_tiles=2)
    holdings = LoadedTensors(TENSORS, Identity("m"), manifest=manifest, ringed=fake_device)
    return HeldChunks(holdings, wait=1.0)


def test_chunks_come_out_byte_for_byte(held: HeldChunks) -> None:
    manifest = held.holdings.manifest(1.0)
    names = [t.name for t in manifest.tensors]
    assert any(c.strided for c in manifest.chunks)
    assert any(len(c.pieces) > 1 for c in manifest.chunks)
    for chunk in manifest.chunks:
        data = b"".join(bytes(v) for v in held.views(chunk))
        held.release(chunk)
        assert data == expected(chunk, names), chunk.number


def test_host_memory_is_the_ring_not_the_tensors(held: HeldChunks) -> None:
    manifest = held.holdings.manifest(1.0)
    for chunk in manifest.chunks:
        held.views(chunk)
        held.release(chunk)
    staging = held.holdings._host  # type: ignore[attr-defined]
    ring = staging.ring
    assert ring is not None
    assert ring.slots == holdings_module.RING_SLOTS
    assert ring.slot_bytes == manifest.largest_chunk <= 4096
    # Only the host tensor was ever looked at whole (a view: no copy); none of the
    # "device" tensors was copied to the host whole.
    whole = {manifest.tensors[i].name for i in staging._made}
    assert whole <= {"host"}
    assert ring.slots * ring.slot_bytes < TENSORS["big"].nbytes


def test_a_sender_that_keeps_its_slots_waits_then_fails(
    held: HeldChunks, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Host memory never grows past the ring: without releases, the next chunk waits for
    a slot and the transfer fails; release_all frees them for the next."""
    monkeypatch.setattr(holdings_module, "RING_WAIT", 0.05)
    manifest = held.holdings.manifest(1.0)
    device_chunks = [c for c in manifest.chunks if c.pieces[0].tensor == 0]
    assert len(device_chunks) > holdings_module.RING_SLOTS
    for chunk in device_chunks[: holdings_module.RING_SLOTS]:
        held.views(chunk)
    with pytest.raises(TransferTimeout):
        held.views(device_chunks[holdings_module.RING_SLOTS])
    held.release_all()
    assert held.views(device_chunks[holdings_module.RING_SLOTS])


def test_concurrent_senders_share_the_ring(held: HeldChunks) -> None:
    manifest = held.holdings.manifest(1.0)
    names = [t.name for t in manifest.tensors]
    errors: list[str] = []

    def send_all() -> None:
        mine = HeldChunks(held.holdings, wait=1.0)
        for _ in range(5):
            for chunk in manifest.chunks:
                data = b"".join(bytes(v) for v in mine.views(chunk))
                mine.release(chunk)
                if data != expected(chunk, names):
                    errors.append(f"chunk {chunk.number}")

    threads = [threading.Thread(target=send_all) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
