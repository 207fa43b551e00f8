"""The sans-IO protocol and the manifest, without a network: valid input decodes, anything
else raises ProtocolError and nothing else (property-based)."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader import ProtocolError
from netloader import protocol as p
from netloader.manifest import (
    MAX_PIECES,
    Identity,
    Manifest,
    TensorEntry,
    build_manifest,
    digest,
    expected_manifest,
    plan_chunks,
)

MANIFEST = build_manifest(
    Identity("m", 2, 1, 1, 0, {"dtype": "bf16"}),
    {"a": torch.arange(10.0), "b": torch.zeros(3, 4, dtype=torch.bfloat16), "e": torch.empty(0)},
    chunk_bytes=16,
)


def test_manifest_json_round_trip() -> None:
    decoded = Manifest.from_json(json.loads(json.dumps(MANIFEST.to_json())))
    assert decoded == MANIFEST
    assert [[tuple(piece)[:3] for piece in c.pieces] for c in decoded.chunks] == [
        [(0, 0, 16)],  # 'a' (40 bytes) is larger than a chunk: chunks of whole rows
        [(0, 16, 16)],
        [(0, 32, 8)],
        [(1, 0, 16)],  # 'b': rows of 8 bytes, two to a chunk
        [(1, 16, 8)],
        [(2, 0, 0)],  # the empty tensor is a zero-length piece
    ]
    assert len(decoded.digests) == 6


def entries(*sizes: int | tuple[int, int]) -> list[TensorEntry]:
    """uint8 tensors: n bytes in one dimension, or (rows, row bytes)."""
    out = []
    for i, size in enumerate(sizes):
        shape = size if isinstance(size, tuple) else (size,)
        out.append(TensorEntry(f"t{i}", "uint8", shape, math.prod(shape)))
    return out


def test_small_tensors_share_chunks_and_large_ones_split_on_rows() -> None:
    plan = plan_chunks(entries(3, 0, 4, 10, (5, 6), 1, (1, 40)), chunk_bytes=16)
    assert [[tuple(p)[:3] for p in c.pieces] for c in plan] == [
        [(0, 0, 3), (1, 0, 0), (2, 0, 4)],  # coalesced, the empty tensor included
        [(3, 0, 10)],  # would not fit beside them: a chunk of its own, with room left
        [(4, 0, 12)],  # 5 rows of 6 bytes: two rows to a chunk, never half a row
        [(4, 12, 12)],
        [
            (4, 24, 6),
        ],
        [(5, 0, 1)],
        [(6, 0, 16)],  # one row longer than a chunk: cut inside the row
        [(6, 16, 16)],
        [(6, 32, 8)],
    ]
    assert [c.length for c in plan] == [7, 10, 12, 12, 6, 1, 16, 16, 8]
    assert [c.number for c in plan] == list(range(9))


def test_column_tiles_cut_a_matrix_into_row_ranges_of_each_tile() -> None:
    """With column tiles, a matrix larger than a chunk is cut into the row ranges it would
    have untiled, each into one chunk per tile (a strided piece); others as before."""
    plan = plan_chunks(entries(3, (6, 8), 20), chunk_bytes=16, column_tiles=2)
    assert [tuple(c.pieces[0]) for c in plan] == [
        (0, 0, 3, 1, 0),
        (1, 0, 4, 2, 8),  # rows 0-1 of columns 0-3: 2 runs of 4 bytes, 8 apart
        (1, 4, 4, 2, 8),  # rows 0-1 of columns 4-7
        (1, 16, 4, 2, 8),  # rows 2-3
        (1, 20, 4, 2, 8),
        (1, 32, 4, 2, 8),  # rows 4-5
        (1, 36, 4, 2, 8),
        (2, 0, 16, 1, 0),  # one dimension: rows only
        (2, 16, 4, 1, 0),
    ]
    assert [c.length for c in plan] == [3, 8, 8, 8, 8, 8, 8, 16, 4]
    assert plan[2].pieces[0].runs(1000, 4) == [(1000, 4, 4), (1004, 12, 4)]  # here, there


def test_a_tile_digest_covers_its_columns_and_a_box_finds_its_chunks() -> None:
    matrix = torch.arange(48, dtype=torch.uint8).reshape(6, 8)
    tiled = build_manifest(Identity("m"), {"m": matrix}, chunk_bytes=16, column_tiles=2)
    packed = matrix[2:4, 4:8].contiguous().numpy().tobytes()
    assert tiled.digests[3] == digest(packed)
    assert tiled.chunks_covering(0, [(0, 6), (4, 8)]) == [1, 3, 5]  # the right half
    assert tiled.chunks_covering(0, [(4, 5), (0, 8)]) == [4, 5]  # one row: both its tiles
    assert tiled.chunks_covering(0, [(1, 3), (3, 5)]) == [0, 1, 2, 3]
    rows = build_manifest(Identity("m"), {"m": matrix}, chunk_bytes=16)  # 2 rows a chunk
    assert rows.chunks_covering(0, [(2, 5)]) == [1, 2]
    assert rows.chunks_covering(0, [(0, 6), (4, 8)]) == [0, 1, 2]  # columns: every row
    decoded = Manifest.from_json(json.loads(json.dumps(tiled.to_json())))
    assert decoded == tiled and decoded.chunks == tiled.chunks
    for hostile in (0, 65, "2"):
        with pytest.raises(ProtocolError, match="column_tiles"):
            Manifest.from_json({**tiled.to_json(), "column_tiles": hostile})


def test_a_chunk_holds_at_most_max_pieces_tensors() -> None:
    plan = plan_chunks(entries(*[1] * (MAX_PIECES + 5)), chunk_bytes=1 << 20)
    assert [len(c.pieces) for c in plan] == [MAX_PIECES, 5]


def test_the_plan_depends_on_shapes_only_so_unchanged_chunks_keep_their_digests() -> None:
    before = {f"t{i}": torch.full((100,), i, dtype=torch.uint8) for i in range(40)}
    after = dict(before, t7=before["t7"].clone().fill_(99))
    old, new = build_manifest(Identity("m"), before, 256), build_manifest(Identity("m"), after, 256)
    assert old.chunks == new.chunks
    changed = [n for n, (a, b) in enumerate(zip(old.digests, new.digests, strict=True)) if a != b]
    assert changed == [old.chunks_of(7)[0]]
    assert "t7" in old.tensor_names(changed)


def test_a_tiny_chunk_size_cannot_make_a_manifest_plan_without_bound() -> None:
    with pytest.raises(ProtocolError, match="more than 1000 chunks"):
        plan_chunks(entries(1 << 40), chunk_bytes=1, limit=1000)


def test_only_the_attributes_a_client_states_are_constraints() -> None:
    server = Identity("m", attributes={"dtype": "bf16", "config": "abc"})
    assert Identity("m").differences(server) == []
    assert Identity("m", attributes={"dtype": "bf16"}).differences(server) == []
    assert Identity("m", attributes={"dtype": "fp16", "quant": "int8"}).differences(server) == [
        "attribute dtype: expected 'fp16', server has 'bf16' (a different model or build: "
        "`netloader inspect` shows the server's identity)",
        "attribute quant: expected 'int8', server has None (the server does not state it; "
        "leave it out to accept any)",
    ]
    assert Identity("n").differences(server) == [
        "model: expected 'n', server has 'm' (pass 'm' to load the model it serves)"
    ]


def test_manifest_report_is_precise() -> None:
    mine = expected_manifest(Identity("m", 2, 0), {"a": torch.zeros(11), "b": torch.zeros(3, 4)})
    diffs = mine.differences(MANIFEST)
    assert diffs == [
        "tp_rank: expected 0, server has 1",
        "tensor 'a': expected float32[11], server has float32[10]",
        "tensor 'b': expected float32[3, 4], server has bfloat16[3, 4]",
        "tensor 'e' on server only (float32[0])",
    ]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.update(protocol=1),
        lambda m: m.update(digest="md5"),
        lambda m: m.update(chunk_bytes=0),
        lambda m: m["tensors"][0].__setitem__(1, "complex128"),
        lambda m: m["tensors"][0].__setitem__(3, 41),  # nbytes does not match dtype x shape
        lambda m: m.update(digests="0" * 31),  # malformed digests
        lambda m: m.update(digests="A" * 32 * 6),
        lambda m: m.update(digests="0" * 32 * 5),  # wrong digest count
        lambda m: m.update(digests=["0" * 32] * 6),
        lambda m: m["tensors"][0].append([]),  # a row of five
        lambda m: m["tensors"][1].__setitem__(0, "a"),  # duplicate name
        lambda m: m["tensors"][0].__setitem__(2, [-10]),
        lambda m: m["identity"].update(tp_size=0),
        lambda m: m["identity"].update(model=None),
    ],
)
def test_manifest_validation(mutate: Callable[[dict[str, Any]], object]) -> None:
    obj = json.loads(json.dumps(MANIFEST.to_json()))
    mutate(obj)
    with pytest.raises(ProtocolError):
        Manifest.from_json(obj)


def test_frame_bounds() -> None:
    header = p.HEADER.pack(p.MAGIC, p.MsgType.HELLO, 1 << 20)
    with pytest.raises(ProtocolError, match="exceeds"):
        p.decode_header(header)
    with pytest.raises(ProtocolError, match="not a netloader peer"):
        p.decode_header(b"GET / HTTP/1.1\r\n")
    assert p.decode_header(p.encode(p.MsgType.BYE, {})[:16]) == p.FrameHeader(p.MsgType.BYE, 2)


def test_fetch_validated_against_manifest() -> None:
    ok = p.Fetch.decode({"transport": "tcp", "chunks": [5, 0, 2]}).validate(MANIFEST)
    assert ok.chunks == (5, 0, 2)
    for chunks in ([6], [-1], [0, 0], [True], ["0"], [[0]], 3):
        with pytest.raises(ProtocolError):
            p.Fetch.decode({"transport": "tcp", "chunks": chunks}).validate(MANIFEST)


def test_hmac_proofs_are_bound_to_role_and_nonces() -> None:
    a, b = p.new_nonce(), p.new_nonce()
    client, server = p.Role.CLIENT, p.Role.SERVER
    proof = p.proof(b"k", client, a, b)
    assert p.proof_matches(b"k", client, a, b, proof)
    assert not p.proof_matches(b"k", server, a, b, proof)
    assert not p.proof_matches(b"k", client, b, a, proof)
    assert not p.proof_matches(b"other", client, a, b, proof)
    assert not p.proof_matches(b"k", client, a, b, None)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decoders_raise_only_protocol_errors_on_any_bytes(data: bytes) -> None:
    for decode in (p.decode_header, p.decode_body):
        with contextlib.suppress(ProtocolError):
            decode(data)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_typed_messages_on_any_json(value: object) -> None:
    body = value if isinstance(value, dict) else {"x": value}
    for decode in (
        p.Hello.decode,
        p.Welcome.decode,
        lambda b: p.Fetch.decode(b).validate(MANIFEST),
        p.Auth.decode,
        p.Error.decode,
        p.ProcessGroupSetup.decode,
        p.CudaIpcOffer.decode,
        p.CudaIpcTensor.decode,
        Manifest.from_json,
    ):
        with contextlib.suppress(ProtocolError):
            decode(body)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_manifest_decoder_on_mutated_manifests(data: st.DataObject) -> None:
    obj = json.loads(json.dumps(MANIFEST.to_json()))
    row = data.draw(st.integers(0, 2))
    col = data.draw(st.integers(0, 3))
    obj["tensors"][row][col] = data.draw(json_values)
    with contextlib.suppress(ProtocolError):
        Manifest.from_json(obj)
