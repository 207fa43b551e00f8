"""The verifying sink: bytes land in the destination, and count only if their digest
matches the manifest's."""

from __future__ import annotations

import pytest
import torch

from netloader import IntegrityError
from netloader.client import VerifyingSink
from netloader.client import sink as sink_module
from netloader.errors import TransferTimeout
from netloader.manifest import Chunk, Identity, Manifest, build_manifest

SOURCE = {
    "w": torch.arange(40, dtype=torch.float32),  # 160 bytes: chunks of 16 rows
    "s1": torch.randn(3),  # small ones, coalesced into one chunk
    "s2": torch.tensor([7], dtype=torch.uint8),
    "e": torch.empty(0),
    "s3": torch.randn(2, dtype=torch.float16),
    "t": torch.randn(8, 6).t(),  # not contiguous: staged, copied in once complete
}
MANIFEST = build_manifest(Identity("m"), SOURCE, chunk_bytes=64)


def chunk_bytes(source: dict[str, torch.Tensor], manifest: Manifest, chunk: Chunk) -> bytes:
    """A chunk's bytes as a server sends them (a strided piece packed)."""
    out = b""
    for piece in chunk.pieces:
        tensor = source[manifest.tensors[piece.tensor].name].contiguous()
        flat = tensor.reshape(-1).view(torch.uint8)
        out += piece.of(flat).contiguous().numpy().tobytes()
    return out


def land(sink: VerifyingSink, chunk: Chunk, data: bytes) -> None:
    position = 0
    for view in sink.landing(chunk).views:
        view[:] = data[position : position + len(view)]
        position += len(view)


def deliver(sink: VerifyingSink, chunk: Chunk, data: bytes) -> None:
    land(sink, chunk, data)
    sink.received(chunk, source="peer:1")


def source_bytes(chunk: Chunk) -> bytes:
    return chunk_bytes(SOURCE, MANIFEST, chunk)


def zeros() -> dict[str, torch.Tensor]:
    return {n: torch.zeros(t.shape, dtype=t.dtype) for n, t in SOURCE.items()}


def test_the_manifest_coalesces_the_small_tensors() -> None:
    assert [len(c.pieces) for c in MANIFEST.chunks] == [1, 1, 1, 4, 1, 1, 1]


def test_chunks_land_in_place_and_staged_tensors_are_copied_when_complete() -> None:
    dest = zeros()
    dest["t"] = torch.zeros(8, 6).t()  # not contiguous: staged
    arrived: list[Chunk] = []
    progress: list[int] = []
    sink = VerifyingSink(MANIFEST, dest, progress=progress.append, verified=arrived.append)
    for chunk in reversed(MANIFEST.chunks):  # any order
        deliver(sink, chunk, source_bytes(chunk))
    assert all(torch.equal(dest[n], t) for n, t in SOURCE.items())
    assert sorted(sink.completed()) == sorted(SOURCE)
    assert sum(progress) == sink.bytes == MANIFEST.total_bytes
    assert sorted(c.number for c in arrived) == list(range(MANIFEST.chunk_total))


def test_pieces_of_tensors_not_asked_for_are_verified_but_kept_nowhere() -> None:
    dest = {n: t for n, t in zeros().items() if n in ("w", "s1", "s3")}
    arrived: list[Chunk] = []
    sink = VerifyingSink(MANIFEST, dest, verified=arrived.append)
    assert [c.number for c in sink.wanted] == [0, 1, 2, 3]  # not the chunks of 't'
    for chunk in sink.wanted:
        deliver(sink, chunk, source_bytes(chunk))
    assert all(torch.equal(dest[n], SOURCE[n]) for n in dest)
    assert sorted(sink.completed()) == ["s1", "s3", "w"]
    assert [c.number for c in arrived] == [0, 1, 2]  # a relay cannot serve what it lacks


def test_a_corrupt_chunk_is_rejected_and_names_its_source_and_tensors() -> None:
    sink = VerifyingSink(MANIFEST, zeros())
    chunk = MANIFEST.chunks[3]
    bad = bytearray(source_bytes(chunk))
    bad[13] ^= 1  # in 's2', the second tensor of the coalesced chunk
    with pytest.raises(
        IntegrityError,
        match=r"chunk 3 \(tensors 's1' ... 's3' \(4\)\) from peer:1: digest mismatch",
    ) as info:
        deliver(sink, chunk, bytes(bad))
    assert info.value.source == "peer:1"
    assert not sink.is_done(chunk) and sink.completed() == []
    deliver(sink, chunk, source_bytes(chunk))  # fetched again, from a good source
    assert sorted(sink.completed()) == ["e", "s1", "s2", "s3"]


def test_a_digest_computed_on_the_way_is_trusted_only_if_it_matches() -> None:
    sink = VerifyingSink(MANIFEST, zeros())
    chunk = MANIFEST.chunks[0]
    with pytest.raises(IntegrityError):
        sink.received(chunk, "0" * 32)
    sink.received(chunk, MANIFEST.digests[0])
    assert sink.is_done(chunk)


def test_landing_addresses_are_the_views_memory() -> None:
    dest = zeros()
    sink = VerifyingSink(MANIFEST, dest)
    landing = sink.landing(MANIFEST.chunks[3])
    assert landing.addresses == [dest[n].data_ptr() for n in ("s1", "s2", "e", "s3")]
    assert [len(v) for v in landing.views] == [12, 1, 0, 4]


# The device ring, exercised with host tensors routed through it (no GPU here): the logic
# (slots, verify before copy, reuse) is the same; the copy is synchronous on the CPU.
BIG = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.randn(300)}
BIG_MANIFEST = build_manifest(Identity("m"), BIG, chunk_bytes=256)


def big_bytes(chunk: Chunk) -> bytes:
    return chunk_bytes(BIG, BIG_MANIFEST, chunk)


def ringed_sink() -> tuple[VerifyingSink, dict[str, torch.Tensor]]:
    dest = {name: torch.zeros_like(t) for name, t in BIG.items()}
    return VerifyingSink(BIG_MANIFEST, dest, ringed=lambda t: True), dest


def test_ringed_chunks_reach_the_tensor_through_a_few_slots() -> None:
    sink, dest = ringed_sink()
    assert sink.ring is None and not sink.staged  # no whole-tensor staging; the ring
    # is made when the first chunk lands (a device-to-device pull never makes one)
    chunks = list(BIG_MANIFEST.chunks)
    assert len(chunks) > 2 * sink_module.RING_SLOTS
    slots = set()
    for chunk in reversed(chunks):  # any order
        slots.add(sink.landing(chunk).addresses[0])
        land(sink, chunk, big_bytes(chunk))  # the same slot when asked again
        sink.received(chunk, source="peer:1")
    sink.settle()
    assert len(slots) <= sink_module.RING_SLOTS  # host memory bounded by the ring
    assert all(torch.equal(dest[n], t) for n, t in BIG.items())
    assert sorted(sink.completed()) == ["a", "b"]


def test_a_relay_serves_a_ringed_tensor_only_once_all_of_it_arrived() -> None:
    """A server copies a device tensor to host memory whole at the first request: its
    chunks become servable together, once the last one is in."""
    dest = {name: torch.zeros_like(t) for name, t in BIG.items()}
    arrived: list[int] = []
    sink = VerifyingSink(
        BIG_MANIFEST, dest, ringed=lambda t: True, verified=lambda c: arrived.append(c.number)
    )
    first_of_b = BIG_MANIFEST.chunks_of(1)[0]
    for chunk in BIG_MANIFEST.chunks[:first_of_b]:  # all of 'a' but its last chunk
        if chunk.number < first_of_b - 1:
            deliver(sink, chunk, big_bytes(chunk))
    assert arrived == []
    last = BIG_MANIFEST.chunks[first_of_b - 1]
    deliver(sink, last, big_bytes(last))
    assert sorted(arrived) == list(BIG_MANIFEST.chunks_of(0))


def test_a_corrupt_ringed_chunk_never_reaches_the_tensor() -> None:
    sink, dest = ringed_sink()
    chunk = BIG_MANIFEST.chunks[0]
    bad = bytearray(big_bytes(chunk))
    bad[7] ^= 0xFF
    land(sink, chunk, bytes(bad))
    with pytest.raises(IntegrityError, match="digest mismatch"):
        sink.received(chunk, source="peer:1")
    assert not dest["a"].any()  # checked before the copy: nothing was written
    for chunk in BIG_MANIFEST.chunks:  # its slot went back: every chunk still fits
        deliver(sink, chunk, big_bytes(chunk))
    assert all(torch.equal(dest[n], t) for n, t in BIG.items())


def test_a_full_ring_is_a_timeout_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_module, "RING_WAIT", 0.05)
    sink, _ = ringed_sink()
    chunks = iter(BIG_MANIFEST.chunks)
    for _ in range(sink_module.RING_SLOTS):  # in flight, never finished
        sink.landing(next(chunks))
    with pytest.raises(TransferTimeout, match="no host buffer freed"):
        sink.landing(next(chunks))


@pytest.mark.parametrize("kind", ["in place", "staged", "ringed"])
def test_column_tiles_land_packed_and_reach_their_columns(kind: str) -> None:
    """A tiled manifest's chunks are strided pieces: each lands packed and, once verified,
    goes to its columns, wherever the destination is; a corrupt one goes nowhere."""
    source = {"m": torch.randn(64, 32), "b": torch.randn(5)}
    manifest = build_manifest(Identity("m"), source, chunk_bytes=2048, column_tiles=4)
    assert all(c.pieces[0].repeat == 16 for c in manifest.chunks[:-1])
    dest = {"m": torch.zeros(64, 32), "b": torch.zeros(5)}
    if kind == "staged":
        dest["m"] = torch.zeros(32, 64).t()
    ringed = (lambda t: t.shape == (64, 32)) if kind == "ringed" else sink_module.on_device
    sink = VerifyingSink(manifest, dest, ringed=ringed)
    first = manifest.chunks[0]
    with pytest.raises(IntegrityError, match=r"chunk 0 \(tensor 'm'\)"):
        deliver(sink, first, bytes(len(chunk_bytes(source, manifest, first))))
    assert not dest["m"].any()
    for chunk in reversed(manifest.chunks):
        deliver(sink, chunk, chunk_bytes(source, manifest, chunk))
    sink.settle()
    assert torch.equal(dest["m"], source["m"]) and torch.equal(dest["b"], source["b"])


def test_column_tiles_of_tensors_that_are_views_of_a_larger_buffer() -> None:
    """Tensors carved out of one buffer (not at its start): a tile's rows are found from
    the tensor's own first byte, on the server (digests) and in the destination."""
    arena = torch.randn(4096 + 64 * 32)
    source = {"m": arena[4096:].view(64, 32)}
    manifest = build_manifest(Identity("m"), source, chunk_bytes=2048, column_tiles=4)
    copy = {"m": source["m"].clone()}  # the same values in a tensor of its own
    assert manifest.digests == build_manifest(Identity("m"), copy, 2048, column_tiles=4).digests
    target = torch.zeros(1000 + 64 * 32)
    dest = {"m": target[1000:].view(64, 32)}
    sink = VerifyingSink(manifest, dest)
    for chunk in manifest.chunks:
        deliver(sink, chunk, chunk_bytes(copy, manifest, chunk))
    assert torch.equal(dest["m"], source["m"])
    assert not target[:1000].any()  # nothing written before the tensor
