"""Device paths over a real connection, on any machine: a server whose tensors are not on
CUDA refuses the CUDA IPC offer, and the client takes the chunks over tcp on the same
connection, with one log line; a server stages chunks through its ring (host tensors
standing in for device ones). (Pulls that use CUDA are in tests/gpu.)"""

from __future__ import annotations

import logging
import threading

import pytest
import torch

import netloader
from netloader import Client, Identity, UsageError
from netloader.server import holdings
from netloader.testing.models import differing, transformer_like
from netloader.transports import cuda_ipc
from support.tensors import empty_like_set

SECRET = b"a shared secret of decent length"


def test_a_refused_offer_falls_back_to_tcp_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The client asks for CUDA IPC (as TRANSPORT=auto does for CUDA destinations); the
    server holds host tensors and refuses; every chunk still arrives, verified, over tcp."""
    monkeypatch.setattr(cuda_ipc.AUTO, "wants_device", lambda conn, sink: True)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with netloader.serve(expected, "m", secret=SECRET, chunk_bytes=64 << 10) as server:
        caplog.set_level(logging.INFO, logger="netloader")
        report = Client([server.address], secret=SECRET, stripe=1).load_into(dest, Identity("m"))
    assert not differing(dest, expected)
    assert report.transport == "tcp"
    refused = [r for r in caplog.records if "CUDA IPC refused" in r.getMessage()]
    assert len(refused) == 1, [r.getMessage() for r in refused]
    reason = refused[0].getMessage()
    assert "CUDA" in reason and "using tcp" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_forcing_cuda_ipc_without_cuda_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="cuda-ipc needs a CUDA device"):
        Client(["127.0.0.1:1"], transport="cuda-ipc")


def test_a_server_stages_every_chunk_through_its_ring_over_tcp(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Host tensors treated as device ones (the server's `on_device`): two clients at once
    pull over tcp, every chunk copied into one of the server's few ring slots and sent
    from there, bit-identical; no tensor copied whole."""
    monkeypatch.setattr(holdings, "on_device", lambda tensor: True)
    expected = transformer_like()
    with netloader.serve(expected, "m", chunk_bytes=64 << 10) as server:
        dests = [empty_like_set(expected) for _ in range(2)]
        threads = [
            threading.Thread(
                target=Client([server.address], transport="tcp").load_into,
                args=(dest, Identity("m")),
            )
            for dest in dests
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        staging = server.holdings._host  # type: ignore[attr-defined]
        assert staging.ring is not None and staging.ring.slots == holdings.RING_SLOTS
        assert not staging._made  # no host copy of a whole tensor
    for dest in dests:
        assert not differing(dest, expected)
