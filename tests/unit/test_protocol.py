"""The sans-IO protocol and the manifest, without a network: valid input decodes, anything
else raises ProtocolError and nothing else (property-based)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader import ProtocolError
from netloader import protocol as p
from netloader.manifest import Identity, Manifest, build_manifest, expected_manifest

MANIFEST = build_manifest(
    Identity("m", 2, 1, 1, 0, {"dtype": "bf16"}),
    {"a": torch.arange(10.0), "b": torch.zeros(3, 4, dtype=torch.bfloat16), "e": torch.empty(0)},
    chunk_bytes=16,
)


def test_manifest_json_round_trip() -> None:
    decoded = Manifest.from_json(json.loads(json.dumps(MANIFEST.to_json())))
    assert decoded == MANIFEST
    assert [(c.tensor, c.number, c.offset, c.length) for c in decoded.chunks()] == [
        (0, 0, 0, 16),
        (0, 1, 16, 16),
        (0, 2, 32, 8),
        (1, 0, 0, 16),
        (1, 1, 16, 8),
        (2, 0, 0, 0),
    ]


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
        lambda m: m.update(protocol=2),
        lambda m: m.update(digest="md5"),
        lambda m: m.update(chunk_bytes=0),
        lambda m: m["tensors"][0].__setitem__(1, "complex128"),
        lambda m: m["tensors"][0].__setitem__(3, 41),  # nbytes does not match dtype x shape
        lambda m: m["tensors"][0].__setitem__(4, ["00"] * 3),  # malformed digests
        lambda m: m["tensors"][0].__setitem__(4, ["0" * 32]),  # wrong digest count
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
    ok = p.Fetch.decode({"transport": "tcp", "chunks": [[0, 2], [2, 0]]}).validate(MANIFEST)
    assert ok.chunks == ((0, 2), (2, 0))
    for chunks in ([[0, 3]], [[3, 0]], [[0, 0], [0, 0]], [[0, True]], [["0", 0]], [[0]]):
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
        Manifest.from_json,
    ):
        with contextlib.suppress(ProtocolError):
            decode(body)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_manifest_decoder_on_mutated_manifests(data: st.DataObject) -> None:
    obj = json.loads(json.dumps(MANIFEST.to_json()))
    row = data.draw(st.integers(0, 2))
    col = data.draw(st.integers(0, 4))
    obj["tensors"][row][col] = data.draw(json_values)
    with contextlib.suppress(ProtocolError):
        Manifest.from_json(obj)
