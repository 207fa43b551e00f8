"""The conversation's state machine, without sockets or threads: bytes piped between a
ClientSession and a ServerSession in memory."""

from __future__ import annotations

import pytest
import torch

from netloader import AuthenticationError, ProtocolError, VersionMismatch
from netloader import protocol as p
from netloader.manifest import MAX_PIECES, Identity, Manifest, TensorEntry, build_manifest

MANIFEST = build_manifest(Identity("m"), {"a": torch.arange(10.0)}, chunk_bytes=16)
SECRET = b"a shared secret of decent length"


def pipe(sender: p.Session, receiver: p.Session, data: bytes) -> p.Message | p.Data:
    """Deliver `data` (one frame) from `sender` to `receiver`; the event it yields."""
    receiver.receive_data(data)
    event = receiver.next_event()
    assert event is not None
    return event


def handshake(
    client_secret: bytes | None, server_secret: bytes | None
) -> tuple[p.ClientSession, p.ServerSession]:
    client, server = p.ClientSession(client_secret), p.ServerSession(server_secret)
    hello = pipe(client, server, client.hello())
    assert isinstance(hello, p.Hello)
    welcome = pipe(server, client, server.welcome(hello))
    assert isinstance(welcome, p.Welcome)
    auth = client.auth()
    if auth is not None:
        assert isinstance(pipe(client, server, auth), p.Auth)
    return client, server


@pytest.mark.parametrize("secret", [None, SECRET])
def test_a_whole_conversation(secret: bytes | None) -> None:
    client, server = handshake(secret, secret)
    assert client.phase is server.phase is p.Phase.READY
    assert isinstance(pipe(client, server, client.send(p.GetManifest())), p.GetManifest)
    got = pipe(server, client, server.send(p.ManifestMessage(MANIFEST)))
    assert isinstance(got, p.ManifestMessage) and got.manifest == MANIFEST
    fetch = pipe(client, server, client.send(p.Fetch("tcp", (0, 1))))
    assert isinstance(fetch, p.Fetch) and fetch.validate(MANIFEST).chunks == (0, 1)
    assert client.phase is p.Phase.TRANSFER
    data = pipe(server, client, server.send(p.Data(1, b"x" * 16)))
    assert data == p.Data(1, b"x" * 16)
    assert isinstance(pipe(server, client, server.send(p.End())), p.End)
    assert client.phase is server.phase is p.Phase.READY
    assert isinstance(pipe(client, server, client.send(p.Bye())), p.Bye)
    assert client.phase is server.phase is p.Phase.CLOSED


def test_out_of_band_transfer_ends_with_done() -> None:
    client, server = handshake(None, None)
    pipe(client, server, client.send(p.Fetch("gloo", (0,))))
    setup = pipe(server, client, server.send(p.ProcessGroupSetup(29500, "gloo")))
    assert setup == p.ProcessGroupSetup(29500, "gloo")
    with pytest.raises(ProtocolError, match="sent DATA in phase out_of_band"):
        pipe(server, client, server.send(p.Data(0, b"")))


def test_partial_bytes_wait_for_the_rest() -> None:
    client, server = p.ClientSession(None), p.ServerSession(None)
    frame = client.hello()
    for byte in frame[:-1]:
        server.receive_data(bytes([byte]))
        assert server.next_event() is None
    server.receive_data(frame[-1:])
    assert isinstance(server.next_event(), p.Hello)


def test_wrong_secret_fails_on_both_sides() -> None:
    client, server = p.ClientSession(b"the client's secret, not the same"), p.ServerSession(SECRET)
    hello = pipe(client, server, client.hello())
    assert isinstance(hello, p.Hello)
    with pytest.raises(AuthenticationError, match="could not prove"):
        pipe(server, client, server.welcome(hello))
    # A client that skipped the check cannot forge a proof the server accepts either.
    client2, server2 = p.ClientSession(None), p.ServerSession(SECRET)
    hello2 = pipe(client2, server2, client2.hello())
    assert isinstance(hello2, p.Hello)
    client2.receive_data(server2.welcome(hello2))
    with pytest.raises(AuthenticationError, match="requires a secret"):
        client2.next_event()
    server2.receive_data(p.Auth("00" * 32).encode())
    with pytest.raises(AuthenticationError):
        server2.next_event()
    assert server2.phase is p.Phase.CLOSED


def test_a_client_with_a_secret_requires_the_server_to_prove_it() -> None:
    client, server = p.ClientSession(SECRET), p.ServerSession(None)
    hello = pipe(client, server, client.hello())
    assert isinstance(hello, p.Hello)
    with pytest.raises(AuthenticationError, match="could not prove"):
        pipe(server, client, server.welcome(hello))


def test_proofs_cannot_be_reflected() -> None:
    a, b = p.new_nonce(), p.new_nonce()
    server_proof = p.proof(SECRET, p.Role.SERVER, a, b)
    assert not p.proof_matches(SECRET, p.Role.CLIENT, a, b, server_proof)
    assert p.proof_matches(SECRET, p.Role.SERVER, a, b, server_proof)


def test_version_mismatch_is_refused_by_the_server() -> None:
    server = p.ServerSession(None)
    server.receive_data(p.Hello(99, p.new_nonce()).encode())
    hello = server.next_event()
    assert isinstance(hello, p.Hello)
    with pytest.raises(VersionMismatch, match="client 99"):
        server.welcome(hello)
    error = p.ClientSession(None)
    error.receive_data(server.send(p.Error(p.ErrorCode.VERSION, "server speaks protocol 1")))
    refused = error.next_event()
    assert isinstance(refused, p.Error) and isinstance(refused.exception("s"), VersionMismatch)
    assert server.phase is error.phase is p.Phase.CLOSED


@pytest.mark.parametrize(
    "frame",
    [
        p.GetManifest().encode(),  # before HELLO
        p.Fetch("tcp", (0,)).encode(),
        p.Bye().encode(),
    ],
)
def test_nothing_but_hello_comes_first(frame: bytes) -> None:
    server = p.ServerSession(SECRET)
    server.receive_data(frame)
    with pytest.raises(ProtocolError, match="expected HELLO"):
        server.next_event()


def test_a_large_frame_is_refused_from_its_header_before_authentication() -> None:
    """A first frame claiming a 256 MiB MANIFEST (or FETCH) is refused from the header: no
    body is read or allocated."""
    server = p.ServerSession(SECRET)
    server.receive_data(p.HEADER.pack(p.MAGIC, p.MsgType.MANIFEST, 256 << 20))
    with pytest.raises(ProtocolError, match="expected HELLO"):
        server.next_event()
    client, server = p.ClientSession(SECRET), p.ServerSession(SECRET)
    hello = pipe(client, server, client.hello())
    assert isinstance(hello, p.Hello)
    server.welcome(hello)
    server.receive_data(p.HEADER.pack(p.MAGIC, p.MsgType.AUTH, 1 << 20))
    with pytest.raises(ProtocolError, match=r"exceeds|during the handshake"):
        server.next_event()


def test_a_side_cannot_send_out_of_turn() -> None:
    client, server = handshake(None, None)
    with pytest.raises(ProtocolError, match=r"client \(us\) sent END"):
        client.send(p.End())
    with pytest.raises(ProtocolError, match="server"):
        server.send(p.GetManifest())


def test_a_server_that_answers_out_of_turn_is_refused() -> None:
    client, _server = handshake(None, None)
    client.send(p.GetManifest())
    client.receive_data(p.Data(0, b"").encode())
    with pytest.raises(ProtocolError, match="sent DATA in phase manifest, expected MANIFEST"):
        client.next_event()


def test_every_error_code_maps_to_an_exception() -> None:
    for code in p.ErrorCode:
        error = p.Error.decode(p.decode_body(p.Error(code, "why").encode()[p.HEADER.size :]))
        assert error.code is code
        exc = error.exception("peer:1")
        assert exc.source == "peer:1" and "why" in str(exc)
    assert p.Error.decode({"code": "new-in-v9", "message": 5}).code is p.ErrorCode.UNKNOWN


def test_transition_table_names_only_known_messages() -> None:
    senders = {kind: who for (_, who, kind) in p.session.TRANSITIONS}
    assert senders[p.MsgType.HELLO] is p.Role.CLIENT
    assert senders[p.MsgType.MANIFEST] is p.Role.SERVER
    assert set(senders) == set(p.MsgType) - {p.MsgType.ERROR}


def relayed_handshake() -> tuple[p.ClientSession, p.ServerSession]:
    """A client and a server with the secret, handshake passed through a relay without it."""
    return handshake(SECRET, SECRET)


def test_after_the_handshake_every_control_frame_is_tagged() -> None:
    client, server = relayed_handshake()
    frame = client.send(p.GetManifest())
    assert len(frame) == p.HEADER.size + len(b'{"part":"weights"}') + p.TAG_BYTES
    assert isinstance(pipe(client, server, frame), p.GetManifest)
    tagged = server.send(p.ManifestMessage(MANIFEST))
    got = pipe(server, client, tagged)
    assert isinstance(got, p.ManifestMessage) and got.manifest == MANIFEST


def test_a_relay_without_the_secret_cannot_feed_a_forged_manifest() -> None:
    """The relaying attack: HELLO, WELCOME and AUTH passed through, then the relay answers
    the client itself with a manifest whose digests match its own forged tensors."""
    client, _ = relayed_handshake()
    client.send(p.GetManifest())
    forged = build_manifest(Identity("m"), {"a": torch.zeros(10)}, chunk_bytes=16)
    client.receive_data(p.ManifestMessage(forged).encode())  # untagged: refused
    with pytest.raises(AuthenticationError, match="failed its session check"):
        client.next_event()
    # Nor with a tag made up, nor with the genuine tag of another message.
    client, _server = relayed_handshake()
    client.send(p.GetManifest())
    frame = p.ManifestMessage(forged).encode()
    body = frame[p.HEADER.size :]
    head = p.HEADER.pack(p.MAGIC, p.MsgType.MANIFEST, len(body) + p.TAG_BYTES)
    client.receive_data(head + body + bytes(p.TAG_BYTES))
    with pytest.raises(AuthenticationError):
        client.next_event()


def test_a_relay_without_the_secret_cannot_ask_the_server_for_anything() -> None:
    client, server = relayed_handshake()
    server.receive_data(p.GetManifest().encode())
    with pytest.raises(AuthenticationError, match="failed its session check"):
        server.next_event()
    # Replaying the client's own genuine request out of sequence fails too.
    client, server = relayed_handshake()
    first = client.send(p.GetManifest())
    assert isinstance(pipe(client, server, first), p.GetManifest)
    pipe(server, client, server.send(p.ManifestMessage(MANIFEST)))
    server.receive_data(first)
    with pytest.raises(AuthenticationError):
        server.next_event()


def test_without_a_secret_frames_are_not_tagged() -> None:
    client, server = handshake(None, None)
    assert not client.keyed and not server.keyed
    assert client.send(p.GetManifest()) == p.GetManifest().encode()


OFFER = p.SameHostOffer("boot", "127.0.0.1:5000", "netloader-" + "ab" * 16, b"t" * 32, 4096)


@pytest.mark.parametrize("secret", [None, SECRET])
def test_same_host_accepted_ends_with_done(secret: bytes | None) -> None:
    client, server = handshake(secret, secret)
    pipe(client, server, client.send(p.Fetch("same-host", (0, 1))))
    assert pipe(server, client, server.send(OFFER)) == OFFER
    assert isinstance(pipe(client, server, client.send(p.SameHostAccept())), p.SameHostAccept)
    named = pipe(server, client, server.send(p.ChunkAddress(0, (1 << 47,))))
    assert named == p.ChunkAddress(0, (1 << 47,))
    with pytest.raises(ProtocolError, match="sent DATA in phase remote_read"):
        server.send(p.Data(1, b"x" * 16))  # no bytes on the connection once accepted
    pipe(server, client, server.send(p.ChunkAddress(1, (8192,))))
    pipe(server, client, server.send(p.End()))
    assert client.phase is p.Phase.OUT_OF_BAND  # the server waits for the reads
    pipe(client, server, client.send(p.Done()))
    assert client.phase is server.phase is p.Phase.READY


def test_same_host_declined_falls_back_to_data_frames() -> None:
    client, server = handshake(None, None)
    pipe(client, server, client.send(p.Fetch("same-host", (0,))))
    pipe(server, client, server.send(OFFER))
    with pytest.raises(ProtocolError, match="sent DATA in phase same_host_offered"):
        server.send(p.Data(0, b"x" * 16))  # not before the client answered
    declined = pipe(client, server, client.send(p.SameHostDecline("another host")))
    assert declined == p.SameHostDecline("another host")
    assert pipe(server, client, server.send(p.Data(0, b"x" * 16))) == p.Data(0, b"x" * 16)
    pipe(server, client, server.send(p.End()))
    assert client.phase is server.phase is p.Phase.READY


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("socket", "../../tmp/x", "malformed same-host offer"),
        ("socket", "netloader-" + "zz" * 16, "malformed same-host offer"),
        ("boot_id", "b" * 65, "malformed same-host offer"),
        ("probe", -1, "not a 64-bit address"),
        ("probe", 1 << 64, "not a 64-bit address"),
        ("probe", True, "wrong type"),
        ("token", "ab", "must be 32 bytes"),
    ],
)
def test_a_malformed_same_host_offer_is_refused(field: str, value: object, error: str) -> None:
    body = OFFER.body() | {field: value}
    with pytest.raises(ProtocolError, match=error):
        p.SameHostOffer.decode(body)


def test_a_chunk_address_must_be_a_64_bit_address() -> None:
    with pytest.raises(ProtocolError, match="each at a 64-bit address"):
        p.ChunkAddress.decode({"chunk": 0, "addresses": [8192, 1 << 64]})
    with pytest.raises(ProtocolError, match="at most 1024"):
        p.ChunkAddress.decode({"chunk": 0, "addresses": [8192] * 1025})


def test_a_100k_tensor_manifest_is_sent_parsed_and_adopted_within_the_bounds() -> None:
    """A mixture-of-experts checkpoint with its scales: 100,000 tiny tensors. The manifest
    stays far below the MANIFEST bound, and the client's structure bound (set from the
    tensors it expects) admits it."""
    entries = tuple(
        TensorEntry(
            f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.weight_scale", "float32", (4,), 16
        )
        for i in range(100_000)
    )
    chunks = Manifest(Identity("m"), entries).chunk_total
    assert chunks == 100_000 // MAX_PIECES + 1  # coalesced: the piece cap, not the bytes
    manifest = Manifest(Identity("m"), entries, digests=tuple(f"{n:032x}" for n in range(chunks)))
    client, server = handshake(SECRET, SECRET)
    client.expect_manifest(len(entries))
    pipe(client, server, client.send(p.GetManifest()))
    frame = server.send(p.ManifestMessage(manifest))
    assert len(frame) < p.MAX_BODY[p.MsgType.MANIFEST] // 16
    got = pipe(server, client, frame)
    assert isinstance(got, p.ManifestMessage) and got.manifest == manifest
    assert Manifest(Identity("m"), entries).differences(got.manifest) == []
    server.expect_fetches(chunks)
    fetch = pipe(client, server, client.send(p.Fetch("tcp", tuple(range(chunks)))))
    assert isinstance(fetch, p.Fetch) and fetch.validate(manifest).chunks == tuple(range(chunks))
