"""The device digest's reference (CPU) form: what it detects, and its place in the manifest.
The GPU tests (tests/gpu) compare the CUDA results to these."""

from __future__ import annotations

import json

import pytest
import torch

from netloader import device_digest as dd
from netloader.errors import ProtocolError
from netloader.manifest import Identity, Manifest, build_manifest

DATA = torch.randint(0, 256, (4099,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def digest(data: torch.Tensor) -> str:
    return dd.device_digest(data)


def test_deterministic_and_equal_for_equal_bytes_wherever_they_lie() -> None:
    first = digest(DATA)
    assert len(first) == dd.DEVICE_DIGEST_HEX and all(c in "0123456789abcdef" for c in first)
    assert digest(DATA) == first
    assert digest(DATA.clone()) == first
    larger = torch.cat([torch.zeros(3, dtype=torch.uint8), DATA])
    assert digest(larger[3:]) == first  # starts unaligned: copied, same digest


def test_matches_the_definition_on_a_small_input() -> None:
    """Two words and a one-byte tail, by the module docstring's formulas."""
    data = torch.tensor([1, 2, 3, 4, 0xFF, 0, 0, 0x80, 9], dtype=torch.uint8)
    words = [0x04030201, 0x800000FF, 0x09]
    sums = []
    for a, b, m, _ in dd._LANES:
        terms = [(w ^ ((a * i + b) % 2**32)) * m for i, w in enumerate(words)]
        sums += [sum(t % 2**32 for t in terms), sum(t >> 32 for t in terms)]
    assert digest(data) == dd.finish(sums, 9)


@pytest.mark.parametrize("position", [0, 1, 2047, 4098])
@pytest.mark.parametrize("bit", [0, 7])
def test_a_flipped_bit_changes_it(position: int, bit: int) -> None:
    flipped = DATA.clone()
    flipped[position] ^= 1 << bit
    assert digest(flipped) != digest(DATA)


def test_swapped_or_moved_words_change_it() -> None:
    words = DATA[:4096].view(torch.int32)
    swapped = words.clone()
    swapped[[3, 700]] = swapped[[700, 3]]
    assert not torch.equal(swapped, words)
    assert digest(swapped.view(torch.uint8)) != digest(words.view(torch.uint8))
    rolled = torch.roll(words, 1)  # every word one place on
    assert digest(rolled.view(torch.uint8)) != digest(words.view(torch.uint8))
    # Words that differ only in their top bit, swapped (a weak spot of simpler sums).
    pair = torch.tensor([1, 0x80000001, 5, 6], dtype=torch.int64).to(torch.int32)
    assert digest(pair.view(torch.uint8)) != digest(pair[[1, 0, 2, 3]].view(torch.uint8))


def test_zeroed_range_and_length_change_it() -> None:
    zeroed = DATA.clone()
    zeroed[100:200] = 0
    assert digest(zeroed) != digest(DATA)
    # A trailing zero byte: the same words, another length.
    padded = torch.cat([DATA, torch.zeros(1, dtype=torch.uint8)])
    assert digest(padded) != digest(DATA)
    assert digest(torch.empty(0, dtype=torch.uint8)) == "0" * dd.DEVICE_DIGEST_HEX


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
def test_any_dtype_by_its_bytes(dtype: torch.dtype) -> None:
    tensor = torch.ones(7, 3, dtype=dtype)
    flat = tensor.reshape(-1).view(torch.uint8)
    assert digest(flat) == digest(flat.clone())
    changed = tensor.clone()
    changed[6, 2] = 0
    assert digest(changed.reshape(-1).view(torch.uint8)) != digest(flat)


@pytest.mark.parametrize("length", [1, 2, 3, 5, 6, 7, 4095])
def test_odd_lengths(length: int) -> None:
    data = DATA[:length]
    assert digest(data) == digest(data.clone())
    changed = data.clone()
    changed[-1] ^= 0x10  # the tail word
    assert digest(changed) != digest(data)


def test_blocks_add_up_to_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """Summed block by block (bounded temporaries), the same digest."""
    whole = digest(DATA)
    monkeypatch.setattr(dd, "BLOCK_WORDS", 7)
    assert digest(DATA) == whole


def test_packed_pieces_are_the_concatenation() -> None:
    a, b = DATA[:5], DATA[5:1000]
    matrix = DATA[:4000].view(40, 100)
    column = matrix[:, 10:30]  # a strided piece: its runs
    assert dd.chunk_digest([a, b]) == digest(DATA[:1000])
    assert dd.chunk_digest([column]) == digest(column.contiguous().reshape(-1))
    assert dd.chunk_digest([torch.empty(0, dtype=torch.uint8), a]) == digest(a)


def test_refuses_what_is_not_flat_bytes() -> None:
    with pytest.raises(ValueError):
        digest(torch.zeros(4, dtype=torch.float32))


# ---- in the manifest ------------------------------------------------------------------

TENSORS = {
    "w": torch.randn(64, 8),
    "b": torch.randn(3, dtype=torch.float16),  # 6 bytes: coalesced, unaligned after it
    "c": torch.arange(5, dtype=torch.uint8),
    "t": torch.randn(16, 16),
}


def test_a_host_model_carries_no_device_digests() -> None:
    manifest = build_manifest(Identity("m"), TENSORS, chunk_bytes=256)
    assert manifest.device_digests == ()
    assert "device_digests" not in manifest.to_json()  # the format as before


def test_device_digests_per_chunk_round_trip_and_match_the_bytes() -> None:
    manifest = build_manifest(
        Identity("m"), TENSORS, chunk_bytes=256, column_tiles=2, device_digests=True
    )
    assert len(manifest.device_digests) == manifest.chunk_total > 4
    values = list(TENSORS.values())
    for chunk, expected in zip(manifest.chunks, manifest.device_digests, strict=True):
        parts = [p.of(values[p.tensor].reshape(-1).view(torch.uint8)) for p in chunk.pieces]
        assert dd.chunk_digest(parts) == expected
    decoded = Manifest.from_json(json.loads(manifest.json_bytes))
    assert decoded.device_digests == manifest.device_digests
    assert decoded.digests == manifest.digests


def test_an_older_manifest_without_them_decodes() -> None:
    manifest = build_manifest(Identity("m"), TENSORS, chunk_bytes=256, device_digests=True)
    obj = json.loads(manifest.json_bytes)
    del obj["device_digest"], obj["device_digests"]
    assert Manifest.from_json(obj).device_digests == ()


@pytest.mark.parametrize(
    "change",
    [
        {"device_digest": "md5"},
        {"device_digests": "ab"},
        {"device_digests": "X" * dd.DEVICE_DIGEST_HEX},
        {"device_digests": "0" * dd.DEVICE_DIGEST_HEX},  # one, for several chunks
        {"device_digests": 5},
        {"digests": ""},
    ],
)
def test_malformed_device_digests_are_refused(change: dict[str, object]) -> None:
    manifest = build_manifest(Identity("m"), TENSORS, chunk_bytes=256, device_digests=True)
    obj = {**json.loads(manifest.json_bytes), **change}
    with pytest.raises(ProtocolError):
        Manifest.from_json(obj)


def test_off_cuda_the_ready_form_is_the_eager_one() -> None:
    """Only a CUDA device is worth a compiled kernel; nothing compiles for the CPU."""
    assert dd.ready(torch.device("cpu")) is dd.lane_sums
