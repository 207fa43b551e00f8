"""TRANSPORT=nixl with real NIXL agents (UCX over host memory here): one-sided reads of
the server's registered memory, each chunk verified; a server that dies mid-read, bad
descriptors, a registration smaller than the chunk, and a peer without NIXL each end in
a TransferError that names the source, never in accepted wrong bytes."""

from __future__ import annotations

import pytest
import torch

import netloader
from netloader import Client, Identity, IntegrityError, SourceUnavailable, TransferError
from netloader.errors import UsageError
from netloader.server.conversation import HeldChunks
from netloader.settings import Timeouts
from netloader.testing.models import differing, same_bytes, transformer_like
from netloader.transports import nixl
from support.servers import StartServer, pull_while_killing_the_first
from support.tensors import empty_like_set

pytestmark = pytest.mark.skipif(nixl.import_error() is not None, reason="nixl is not installed")
VICTIM = "layers.2.attn.qkv"


def test_a_server_process_read_with_nixl(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(256 << 10))
    expected = transformer_like()
    for _ in range(2):  # the second pull reuses both sides' registrations
        dest = empty_like_set(expected)
        report = Client([server.address], transport="nixl").load_into(dest, Identity("m"))
        assert report.transport == "nixl" and report.verified
        assert not differing(dest, expected)


def test_bytes_flipped_in_the_servers_memory_are_rejected(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "m", "--flip-after-digests", VICTIM)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with pytest.raises(IntegrityError, match=f"{VICTIM}.*digest mismatch") as info:
        Client([server.address], transport="nixl").load_into(dest, Identity("m"))
    for name in info.value.completed:
        assert same_bytes(dest[name], expected[name])


def test_a_server_killed_mid_read(start_server: StartServer) -> None:
    report, killed = pull_while_killing_the_first(start_server, "nixl", Timeouts(stall=2))
    assert report.transport == "nixl"
    assert len(report.failures) == 1 and killed in report.failures[0]


@pytest.mark.parametrize("fault", ["unregistered address", "registration too small"])
def test_bad_descriptors_are_refused(monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    """The server names memory its agent never registered, or registered only part of:
    NIXL refuses the read, the client names the chunk and the source."""
    expected = transformer_like()
    if fault == "unregistered address":
        stray = torch.zeros(64 << 20, dtype=torch.uint8)  # never registered
        monkeypatch.setattr(
            HeldChunks, "addresses", lambda self, chunk: [stray.data_ptr()] * len(chunk.pieces)
        )
    else:
        whole = HeldChunks.regions
        monkeypatch.setattr(
            HeldChunks, "regions", lambda self, c: [r[: c.length // 2] for r in whole(self, c)]
        )
    with netloader.serve(expected, "m", chunk_bytes=256 << 10) as server:
        dest = empty_like_set(expected)
        with pytest.raises(TransferError, match="nixl cannot read chunk") as info:
            Client([str(server.address)], transport="nixl").load_into(dest, Identity("m"))
    assert info.value.source == str(server.address)
    assert not info.value.completed


def test_a_server_without_nixl_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*, serving: bool) -> nixl.Agent:
        raise SourceUnavailable(nixl.INSTALL)

    monkeypatch.setattr(nixl, "agent", missing)
    expected = transformer_like()
    with (
        netloader.serve(expected, "m") as server,
        pytest.raises(SourceUnavailable, match="needs the nixl package"),
    ):
        Client([str(server.address)], transport="nixl").load_into(
            empty_like_set(expected), Identity("m")
        )


def test_a_client_without_nixl_is_told_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nixl, "import_error", lambda: nixl.INSTALL)
    with pytest.raises(UsageError, match=r"pip install 'netloader-weights\[nixl\]'"):
        Client(["127.0.0.1:1"], transport="nixl")
