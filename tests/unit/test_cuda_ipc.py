"""The CUDA IPC transport without a GPU: its messages and their bounds, the session's
transitions, the refusals each side makes, TRANSPORT=auto's choice, and the client's copy
and device-digest check (host tensors standing in for device ones). What needs CUDA
itself (exporting, opening, copying between processes) is in tests/gpu."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader import IntegrityError, ProtocolError, SourceUnavailable
from netloader import device_digest as dd
from netloader import protocol as p
from netloader.client import VerifyingSink
from netloader.manifest import Identity, Manifest, build_manifest
from netloader.server.conversation import HeldChunks
from netloader.server.holdings import PartOfModel
from netloader.tensors import flat_bytes
from netloader.transports import cuda_ipc, get, names, same_host
from netloader.transports.tcp import TCP
from unit.test_protocol import json_values
from unit.test_sessions import SECRET, handshake, pipe

STORAGE = p.CudaIpcStorage(0, b"h" * 64, 4096, 512, b"/torch_123_456_7", 3, b"e" * 64, True)
OFFER = p.CudaIpcOffer("boot", "127.0.0.1:5000", ("GPU-1234-abcd",), b"t" * 32, STORAGE)


def test_messages_round_trip() -> None:
    for message in (
        OFFER,
        p.CudaIpcOffer.refused("the server's tensor #3 is not a contiguous CUDA tensor"),
        p.CudaIpcTensor(7, STORAGE, 1024),
    ):
        body = p.decode_body(message.encode()[p.HEADER.size :])
        assert type(message).decode(body) == message


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"token": "ab"}, "must be 32 bytes"),
        ({"devices": []}, "malformed CUDA IPC offer"),
        ({"devices": ["GPU/../x"]}, "malformed CUDA IPC offer"),
        ({"devices": ["g"] * 65}, "malformed CUDA IPC offer"),
        ({"boot_id": "b" * 65}, "malformed CUDA IPC offer"),
        ({"probe": 5}, "must be an object"),
        ({"probe": STORAGE._replace(device=1).to_json()}, "names no offered device"),
        ({"probe": STORAGE.to_json() | {"handle": "zz"}}, "not hex"),
        ({"probe": STORAGE.to_json() | {"handle": "ab" * 1025}}, "longer than 1024"),
        ({"probe": STORAGE.to_json() | {"ref_counter": b"../etc/x".hex()}}, "counter name"),
        ({"probe": STORAGE.to_json() | {"ref_offset": 10000}}, "ref_offset"),
        ({"probe": STORAGE.to_json() | {"size": -1}}, "'size'"),
        ({"probe": STORAGE.to_json() | {"event_sync": 1}}, "wrong type"),
    ],
)
def test_a_malformed_offer_is_refused(change: dict[str, Any], error: str) -> None:
    with pytest.raises(ProtocolError, match=error):
        p.CudaIpcOffer.decode(OFFER.body() | change)


def test_a_malformed_tensor_export_is_refused() -> None:
    body = p.CudaIpcTensor(7, STORAGE, 1024).body()
    for change in ({"tensor": -1}, {"start": True}, {"storage": None}):
        with pytest.raises(ProtocolError):
            p.CudaIpcTensor.decode(body | change)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_decoders_raise_only_protocol_errors_on_mutated_bodies(data: st.DataObject) -> None:
    """Any field of a valid offer or export (its storage's too) replaced by any JSON."""
    message = data.draw(st.sampled_from([OFFER, p.CudaIpcTensor(7, STORAGE, 1024)]))
    body = json.loads(json.dumps(message.body()))
    nested = "probe" if "probe" in body else "storage"
    where = data.draw(st.sampled_from([body, body[nested]]))
    where[data.draw(st.sampled_from(sorted(where)))] = data.draw(json_values)
    with contextlib.suppress(ProtocolError):
        type(message).decode(body)


def test_accepted_ends_with_done() -> None:
    client, server = handshake(SECRET, SECRET)
    pipe(client, server, client.send(p.Fetch("cuda-ipc", (0, 1))))
    assert pipe(server, client, server.send(OFFER)) == OFFER
    assert client.phase is p.Phase.CUDA_IPC_OFFERED
    pipe(client, server, client.send(p.SameHostAccept()))
    exported = p.CudaIpcTensor(0, STORAGE, 0)
    assert pipe(server, client, server.send(exported)) == exported
    pipe(server, client, server.send(p.ChunkAddress(0, (0,))))
    with pytest.raises(ProtocolError, match="sent DATA in phase cuda_ipc_read"):
        server.send(p.Data(1, b"x" * 16))  # no bytes on the connection once accepted
    pipe(server, client, server.send(p.ChunkAddress(1, (16,))))
    pipe(server, client, server.send(p.End()))
    assert client.phase is p.Phase.OUT_OF_BAND
    pipe(client, server, client.send(p.Done()))
    assert client.phase is server.phase is p.Phase.READY


def test_declined_or_refused_falls_back_to_data_frames() -> None:
    client, server = handshake(None, None)
    for offer in (OFFER, p.CudaIpcOffer.refused("no CUDA device")):
        pipe(client, server, client.send(p.Fetch("cuda-ipc", (0,))))
        pipe(server, client, server.send(offer))
        with pytest.raises(ProtocolError, match="sent DATA in phase cuda_ipc_offered"):
            server.send(p.Data(0, b"x" * 16))  # not before the client answered
        pipe(client, server, client.send(p.SameHostDecline("another host")))
        assert pipe(server, client, server.send(p.Data(0, b"x" * 16))) == p.Data(0, b"x" * 16)
        pipe(server, client, server.send(p.End()))
        assert client.phase is server.phase is p.Phase.READY


def test_exports_belong_to_cuda_ipc_only() -> None:
    client, server = handshake(None, None)
    pipe(client, server, client.send(p.Fetch("same-host", (0,))))
    pipe(
        server,
        client,
        server.send(p.SameHostOffer("b", "1.2.3.4:5", "netloader-" + "ab" * 16, b"t" * 32, 64)),
    )
    pipe(client, server, client.send(p.SameHostAccept()))
    with pytest.raises(ProtocolError, match="sent CUDA_IPC_TENSOR in phase remote_read"):
        server.send(p.CudaIpcTensor(0, STORAGE, 0))


# ---- refusals -----------------------------------------------------------------------------

SOURCE = {
    "w": torch.randn(64, 16),  # 4 KiB: chunks of its own
    "b": torch.randn(3, dtype=torch.float16),  # coalesced, odd lengths
    "c": torch.arange(5, dtype=torch.uint8),
    "m": torch.randn(32, 8),  # column tiles: strided pieces
}


def manifest(device_digests: bool = True) -> Manifest:
    return build_manifest(
        Identity("m"), SOURCE, chunk_bytes=1024, column_tiles=2, device_digests=device_digests
    )


def device_sink(offered: Manifest, dest: Mapping[str, torch.Tensor]) -> VerifyingSink:
    """A sink whose host tensors stand in for CUDA destinations."""
    sink = VerifyingSink(offered, dest, ringed=lambda t: True)
    sink.device_type = "cpu"
    return sink


def zeros() -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(t) for n, t in SOURCE.items()}


def test_the_server_refuses_without_a_secret_cuda_or_cuda_tensors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tensors = {0: SOURCE["w"]}
    assert "shared secret" in (cuda_ipc.server_refusal(False, tensors) or "")
    if not torch.cuda.is_available():
        assert "no CUDA device" in (cuda_ipc.server_refusal(True, tensors) or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "#0 is not a contiguous CUDA tensor" in (cuda_ipc.server_refusal(True, tensors) or "")


def test_the_client_refuses_without_a_secret_cuda_or_device_destinations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    offered = manifest()
    chunks = offered.chunks
    plain = VerifyingSink(offered, zeros())  # host destinations
    without_digests = device_sink(manifest(device_digests=False), zeros())
    on_device = device_sink(offered, zeros())
    assert "shared secret" in (cuda_ipc.client_refusal(False, chunks, plain) or "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "not all contiguous CUDA" in (cuda_ipc.client_refusal(True, chunks, plain) or "")
    assert not plain.all_on_device()
    assert cuda_ipc.client_refusal(True, chunks, without_digests) is not None
    assert cuda_ipc.client_refusal(True, chunks, on_device) is None


def fake_conn(keyed: bool, declined: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(
        session=SimpleNamespace(keyed=keyed), declined=declined or {}, peer="peer:1"
    )


def test_auto_picks_cuda_ipc_only_for_device_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = get("auto")
    offered = manifest()
    on_device, on_host = device_sink(offered, zeros()), VerifyingSink(offered, zeros())
    older = device_sink(manifest(device_digests=False), zeros())  # a server before them
    assert auto.for_connection(fake_conn(True), on_device) is same_host.AUTO  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto.for_connection(fake_conn(True), on_device) is cuda_ipc.CUDA_IPC_AUTO
    assert auto.for_connection(fake_conn(True), on_host) is same_host.AUTO
    assert auto.for_connection(fake_conn(True), older) is same_host.AUTO
    assert auto.for_connection(fake_conn(False), on_device) is same_host.AUTO
    declined = fake_conn(True, {"cuda-ipc": "IPC not permitted"})
    assert auto.for_connection(declined, on_device) is TCP  # once refused, tcp
    assert auto.for_connection(fake_conn(True)) is same_host.AUTO  # no sink: as before
    assert "cuda-ipc" in names()


# ---- the client's copies and checks ----------------------------------------------------


def copies_from(
    server: Mapping[str, torch.Tensor], offered: Manifest, sink: VerifyingSink
) -> cuda_ipc._Copies:
    """The client's copier with the server's tensors as if opened (each its own storage,
    starting at byte 0)."""
    copies = cuda_ipc._Copies(fake_conn(True), sink, {0: 0}, lambda device: dd.lane_sums)
    for index, entry in enumerate(offered.tensors):
        copies.opened[index] = (flat_bytes(server[entry.name]), 0)
    return copies


def offsets(offered: Manifest, number: int) -> tuple[int, ...]:
    return tuple(piece.offset for piece in offered.chunks[number].pieces)


def test_every_chunk_is_copied_and_verified_on_the_device() -> None:
    offered = manifest()
    dest = zeros()
    sink = device_sink(offered, dest)
    assert sink.all_on_device()
    copies = copies_from(SOURCE, offered, sink)
    for chunk in offered.chunks:
        copies.copy(chunk, offsets(offered, chunk.number))
    assert len(copies.pending) < cuda_ipc.WINDOW  # checked a few chunks behind
    while copies.pending:
        copies.check_oldest()
    assert sorted(sink.completed()) == sorted(SOURCE)
    for name, tensor in SOURCE.items():
        assert torch.equal(dest[name], tensor), name


def test_a_byte_changed_in_the_servers_memory_is_rejected() -> None:
    offered = manifest()
    changed = {n: t.clone() for n, t in SOURCE.items()}
    flat_bytes(changed["w"])[1] ^= 0x01  # after the digests (the first chunk's bytes)
    sink = device_sink(offered, zeros())
    copies = copies_from(changed, offered, sink)
    victim = offered.chunks_of(0)[0]
    copies.copy(offered.chunks[victim], offsets(offered, victim))
    with pytest.raises(IntegrityError, match="device digest mismatch"):
        copies.check_oldest()
    assert "w" not in sink.completed() and not sink.is_done(offered.chunks[victim])


def test_offsets_outside_the_export_are_refused() -> None:
    offered = manifest()
    sink = device_sink(offered, zeros())
    copies = copies_from(SOURCE, offered, sink)
    first = offered.chunks[0]
    with pytest.raises(ProtocolError, match="outside what it exported"):
        copies.copy(first, (first.pieces[0].offset + 8,))
    copies.opened[0] = (flat_bytes(SOURCE["w"])[:100], 0)  # a storage too small
    with pytest.raises(ProtocolError, match="outside what it exported"):
        copies.copy(first, offsets(offered, 0))
    with pytest.raises(ProtocolError, match="wrongly"):
        copies.copy(first, ())
    del copies.opened[0]
    with pytest.raises(ProtocolError, match="did not export"):
        copies.copy(first, offsets(offered, 0))


def test_a_server_lacking_a_tensor_says_so_before_any_offer() -> None:
    """A server holding part of a model (a relay of a delta) is unavailable for the rest,
    as over tcp, rather than failing while it exports."""
    offered = manifest()
    part = PartOfModel({"w": SOURCE["w"]}, offered, lacking="it holds only the delta")
    held = HeldChunks(part, wait=1.0)
    with pytest.raises(SourceUnavailable, match="does not hold tensor 'b'"):
        cuda_ipc._Exported(fake_conn(True), held, offered.chunks)


def accept(offer: p.CudaIpcOffer, monkeypatch: pytest.MonkeyPatch, **fakes: Any) -> dict[int, int]:
    """`_accept` on a connection whose far end is 127.0.0.1:5000 on host "boot", with CUDA
    present and `fakes` in place of the CUDA calls."""
    sink = device_sink(manifest(), zeros())
    conn = fake_conn(True)
    conn.sock = SimpleNamespace(getsockname=lambda: ("127.0.0.1", 5000))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda_ipc.process_memory, "boot_id", lambda: "boot")
    for name, fake in fakes.items():
        monkeypatch.setattr(cuda_ipc, name, fake)
    return cuda_ipc._accept(conn, offer, sink.wanted, sink)


def probe_holding(data: bytes) -> Any:
    return lambda storage, device: torch.frombuffer(bytearray(data), dtype=torch.uint8)


@pytest.mark.parametrize(
    ("offer", "fakes", "reason"),
    [
        (p.CudaIpcOffer.refused("no CUDA device there"), {}, "no CUDA device there"),
        (dataclasses.replace(OFFER, boot_id="other"), {}, "another host"),
        (dataclasses.replace(OFFER, peer="127.0.0.1:6000"), {}, "not a direct connection"),
        (OFFER, {"local_devices": dict}, "GPU GPU-1234-abcd is not visible"),
        (
            OFFER,
            {"local_devices": lambda: {"GPU-1234-abcd": 0}, "open_storage": "raise"},
            "CUDA IPC is not permitted here",
        ),
        (
            OFFER,
            {"local_devices": lambda: {"GPU-1234-abcd": 0}, "open_storage": b"x" * 32},
            "does not hold the offer's token",
        ),
    ],
)
def test_every_refusal_names_its_reason(
    offer: p.CudaIpcOffer, fakes: dict[str, Any], reason: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fakes.get("open_storage") == "raise":

        def refused(storage: p.CudaIpcStorage, device: int) -> torch.Tensor:
            raise RuntimeError("cudaIpcOpenMemHandle: operation not permitted")

        fakes["open_storage"] = refused
    elif isinstance(fakes.get("open_storage"), bytes):
        fakes["open_storage"] = probe_holding(fakes["open_storage"])
    with pytest.raises(SourceUnavailable, match=reason):
        accept(offer, monkeypatch, **fakes)


def test_an_offer_that_holds_up_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    devices = accept(
        OFFER,
        monkeypatch,
        local_devices=lambda: {"GPU-1234-abcd": 3},
        open_storage=probe_holding(OFFER.token),
    )
    assert devices == {0: 3}  # the offer's GPU is this process's device 3


def test_an_export_beyond_the_bounds_is_caught_by_its_exporter() -> None:
    """What the client would refuse as malformed, the server sees first (and falls back)."""
    assert STORAGE.unsendable() is None
    assert "longer than" in (STORAGE._replace(handle=b"h" * 1025).unsendable() or "")
    assert "reference counter" in (STORAGE._replace(ref_counter=b"../x").unsendable() or "")
    assert "reference counter" in (STORAGE._replace(ref_offset=10000).unsendable() or "")
