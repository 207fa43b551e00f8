"""Peers that die, freeze or corrupt bytes: the client fails clearly, in time, says which
tensors are complete, and never accepts a wrong byte."""

from __future__ import annotations

import re
import signal
import time

import pytest
import torch
from tensorsets import big, empty_like_set, model_like, same_bytes

from netloader import Client, Identity, IntegrityError, PeerClosed, TransferTimeout
from netloader.errors import SourceUnavailable

MIB = 1 << 20


def test_server_killed_mid_transfer(start_server, proxy) -> None:
    server = start_server("big", "--model", "m")
    slow = proxy(server.address, rate=40 * MIB)  # 64 MiB takes ~1.6 s through it
    expected = big()
    dest = empty_like_set(expected)
    killed_at = None

    def kill_when_half_sent(_: int) -> None:
        nonlocal killed_at
        if killed_at is None and slow.forwarded > 36 * MIB:
            server.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()

    start = time.monotonic()
    with pytest.raises((PeerClosed, TransferTimeout)) as info:
        Client([slow.address], stall_timeout=5).load_into(
            dest, Identity("m"), progress=kill_when_half_sent
        )
    assert killed_at is not None
    assert time.monotonic() - start < 20
    completed = info.value.completed
    assert completed == {"block.0", "block.1"}, completed  # 16 MiB blocks, >36 MiB sent
    for name in completed:
        assert same_bytes(dest[name], expected[name])
    assert "2 of 4 tensors verified" in str(info.value)


def test_frozen_server_times_out(start_server, proxy) -> None:
    server = start_server("big", "--model", "m")
    frozen = proxy(server.address, freeze_after=20 * MIB)
    dest = empty_like_set(big())
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match=r"sent nothing for 1\.5 s") as info:
        Client([frozen.address], stall_timeout=1.5).load_into(dest, Identity("m"))
    assert time.monotonic() - start < 10
    assert info.value.completed == {"block.0"}


def test_sigstopped_server_times_out(start_server) -> None:
    server = start_server("big", "--model", "m")
    dest = empty_like_set(big())
    server.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TransferTimeout):
            Client([server.address], connect_timeout=1, stall_timeout=1).load_into(
                dest, Identity("m")
            )
        assert time.monotonic() - start < 5
    finally:
        server.proc.send_signal(signal.SIGCONT)


@pytest.mark.parametrize("offset", [200_000, 3 * MIB + 17])
def test_flipped_byte_is_detected_and_never_accepted(start_server, proxy, offset: int) -> None:
    server = start_server("model_like", "--model", "m")
    bad = proxy(server.address, flip_at=offset)
    expected = model_like()
    dest = empty_like_set(expected)
    with pytest.raises(IntegrityError, match="digest mismatch, bytes rejected") as info:
        Client([bad.address]).load_into(dest, Identity("m"))
    completed = info.value.completed
    assert len(completed) < len(expected)
    for name in completed:  # whatever was accepted is right
        assert same_bytes(dest[name], expected[name])


def test_failover_resumes_from_next_source(start_server, proxy) -> None:
    server = start_server("model_like", "--model", "m")
    bad = proxy(server.address, flip_at=2 * MIB)
    good = start_server("model_like", "--model", "m")
    expected = model_like()
    dest = empty_like_set(expected)
    report = Client([bad.address, good.address], stripe=1).load_into(dest, Identity("m"))
    assert report.sources == (bad.address, good.address)  # the first delivered part
    assert len(report.failures) == 1 and "digest mismatch" in report.failures[0]
    total = sum(t.nbytes for t in expected.values())
    assert report.bytes == total
    sent = int(re.search(r"sent \d+ chunks, (\d+) bytes", good.log_text()).group(1))  # type: ignore[union-attr]
    assert 0 < sent < total  # the second source sent only what the first had not
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_sources_with_different_contents_are_never_mixed(start_server, proxy) -> None:
    """Source 1 dies halfway; source 2 serves the same names and shapes but other bytes.
    Taking the rest from it would silently mix two models: refused."""
    first = start_server("model_like", "--model", "m")
    cut = proxy(first.address, freeze_after=2 * MIB)
    other = start_server("model_like", "--model", "m", "--mutate", "layers.3.mlp.down")
    dest = empty_like_set(model_like())
    with pytest.raises(Exception, match="content differs from the first source") as info:
        Client([cut.address, other.address], stall_timeout=1, stripe=1).load_into(
            dest, Identity("m")
        )
    assert "layers.3.mlp.down" not in info.value.completed  # type: ignore[attr-defined]


def test_no_reachable_source(tmp_path) -> None:
    dest = empty_like_set(model_like())
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"cannot connect to 127\.0\.0\.1:1"):
        Client(["127.0.0.1:1"], connect_timeout=2).load_into(dest, Identity("m"))
    assert time.monotonic() - start < 5
    assert torch.all(dest["embed.weight"].view(torch.uint8) == 0xA5)


def test_malformed_manifest_from_a_hostile_server_fails_over(start_server, fake_server) -> None:  # type: ignore[no-untyped-def]
    """A fake server that completes the handshake, then sends a manifest that does not
    validate (no model name, byte count not matching dtype x shape): a clear
    TransferError, and the next source still serves the pull."""
    from netloader import protocol as p
    from netloader.manifest import PROTOCOL_VERSION

    body = {
        "protocol": 1,
        "digest": "xxh3_128",
        "chunk_bytes": 1,
        "identity": {},
        "tensors": [["x", "float32", [2], 4, []]],
    }
    bad = fake_server(
        p.Welcome(PROTOCOL_VERSION, False, p.new_nonce(), None).encode(),
        p.encode(p.MsgType.MANIFEST, body),
    )
    good = start_server("model_like", "--model", "m")
    expected = model_like()
    dest = empty_like_set(expected)
    report = Client([bad, good.address]).load_into(dest, Identity("m"))
    assert report.sources == (good.address,)
    assert "broke the protocol" in report.failures[0]
    assert all(same_bytes(dest[n], t) for n, t in expected.items())
