"""The server dies, freezes or is not there: at each phase of the conversation (with a
clean close or a reset), killed or frozen mid-transfer, SIGSTOPped, unreachable. The
client raises a clear TransferError in bounded time, says which tensors are complete
(and they are right), and a fallback source completes the pull."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest
import torch

import netloader
from netloader import Client, Identity, PeerClosed, TransferError, TransferTimeout
from netloader import protocol as p
from netloader.errors import SourceUnavailable
from netloader.testing.models import blocks, same_bytes, transformer_like
from support.proxy import FaultyProxy
from support.servers import MakeProxy, StartServer
from support.tensors import SENTINEL, empty_like_set

MIB = 1 << 20
Frames = list[tuple[p.MsgType, int, int, int | None]]


def _frames(stream: bytes) -> Frames:
    """(type, start, end, chunk index for DATA) of each frame in a recorded stream."""
    out, at = [], 0
    while at < len(stream):
        header = p.decode_header(stream[at : at + p.HEADER.size])
        body = at + p.HEADER.size
        chunk = None
        if header.type is p.MsgType.DATA:
            chunk = p.decode_data_prefix(stream[body : body + p.DATA_PREFIX.size])
        out.append((header.type, at, body + header.length, chunk))
        at = body + header.length
    return out


@pytest.fixture(scope="module")
def layout() -> Iterator[Frames]:
    """The server->client byte stream of a whole pull of transformer_like(), frame by
    frame."""
    with netloader.serve(transformer_like(), identity="m", chunk_bytes=MIB) as server:
        recorder = FaultyProxy(server.address, record=True)
        Client([recorder.address]).load_into(empty_like_set(transformer_like()), Identity("m"))
        recorder.close()
    assert recorder.recorded is not None
    yield _frames(bytes(recorder.recorded))


def _phase_offset(layout: Frames, phase: str) -> int:
    data = [f for f in layout if f[0] is p.MsgType.DATA]
    manifest = next(f for f in layout if f[0] is p.MsgType.MANIFEST)
    return {
        "before handshake": 0,
        "mid welcome": 20,
        "during manifest": manifest[1] + (manifest[2] - manifest[1]) // 2,
        "mid-tensor": data[2][1] + 5000,
        "between tensors": data[0][2],  # a chunk holds whole tensors here
        "before end": data[-1][2],
    }[phase]


PHASES = ["before handshake", "mid welcome", "during manifest", "mid-tensor", "between tensors"]


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
@pytest.mark.parametrize("phase", PHASES)
def test_server_dies_at_each_phase(
    start_server: StartServer, proxy: MakeProxy, layout: Frames, phase: str, reset: bool
) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(MIB))
    dying = proxy(server.address, cut_at=_phase_offset(layout, phase), reset=reset)
    expected = transformer_like()
    dest = empty_like_set(expected)
    start = time.monotonic()
    with pytest.raises(TransferError) as info:
        Client([dying.address], timeouts=netloader.Timeouts(stall=3)).load_into(dest, Identity("m"))
    assert time.monotonic() - start < 5  # a hang-up is noticed at once, not by timeout
    assert "pull incomplete" in str(info.value)
    completed = info.value.completed
    for name in completed:
        assert same_bytes(dest[name], expected[name])
    if phase == "between tensors":  # a reset may discard bytes the client had not read yet
        first_chunk = {"embed.weight", "layers.0.attn.qkv"}  # two tensors share it
        assert completed in ((set(), first_chunk) if reset else (first_chunk,))
    elif phase != "mid-tensor":
        assert not completed


@pytest.mark.parametrize("phase", [*PHASES, "before end"])
def test_fallback_source_completes_after_death_at_any_phase(
    start_server: StartServer, proxy: MakeProxy, layout: Frames, phase: str
) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(MIB))
    backup = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(MIB))
    dying = proxy(server.address, cut_at=_phase_offset(layout, phase), reset=True)
    expected = transformer_like()
    dest = empty_like_set(expected)
    Client([dying.address, backup.address], stripe=1).load_into(dest, Identity("m"))
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_a_source_that_dropped_the_connection_once_is_tried_again(
    start_server: StartServer, proxy: MakeProxy, layout: Frames, caplog: pytest.LogCaptureFixture
) -> None:
    """A reset mid-tensor from the only source (a server that gave up on a slow client, a
    middlebox): the pull connects again, resumes, and completes."""
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(MIB))
    flaky = proxy(server.address, cut_at=_phase_offset(layout, "mid-tensor"), reset=True, once=True)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with caplog.at_level("INFO", logger="netloader"):
        report = Client([flaky.address]).load_into(dest, Identity("m"))
    assert all(same_bytes(dest[n], t) for n, t in expected.items())
    assert report.verified and report.sources == (flaky.address,)
    assert len(report.failures) == 1 and flaky.address in report.failures[0], report.failures
    assert f"trying {flaky.address} again" in caplog.text


def test_a_manifest_is_asked_for_again_from_a_source_that_dropped_the_connection(
    start_server: StartServer, proxy: MakeProxy, layout: Frames
) -> None:
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(MIB))
    cut = _phase_offset(layout, "during manifest")
    flaky = proxy(server.address, cut_at=cut, reset=True, once=True)
    assert Client([flaky.address]).manifest().identity.model == "m"
    dead = proxy(server.address, cut_at=cut, reset=True)  # every connection: it fails
    with pytest.raises(SourceUnavailable, match="no source answered"):
        Client([dead.address]).manifest()


def test_server_killed_mid_transfer(start_server: StartServer, proxy: MakeProxy) -> None:
    server = start_server("blocks", "--model", "m")
    slow = proxy(server.address, rate=40 * MIB)  # 64 MiB takes ~1.6 s through it
    expected = blocks()
    dest = empty_like_set(expected)
    killed_at = None

    def kill_when_half_sent(_: int) -> None:
        nonlocal killed_at
        if killed_at is None and slow.forwarded > 36 * MIB:
            server.proc.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()

    start = time.monotonic()
    with pytest.raises((PeerClosed, TransferTimeout)) as info:
        Client([slow.address], timeouts=netloader.Timeouts(stall=5)).load_into(
            dest, Identity("m"), progress=kill_when_half_sent
        )
    assert killed_at is not None
    assert time.monotonic() - start < 20
    completed = info.value.completed
    assert completed == {"block.0", "block.1"}, completed  # 16 MiB blocks, >36 MiB sent
    for name in completed:
        assert same_bytes(dest[name], expected[name])
    assert "2 of 4 tensors verified" in str(info.value)


def test_frozen_server_times_out(start_server: StartServer, proxy: MakeProxy) -> None:
    server = start_server("blocks", "--model", "m")
    frozen = proxy(server.address, freeze_after=20 * MIB)
    dest = empty_like_set(blocks())
    start = time.monotonic()
    with pytest.raises(TransferTimeout, match=r"sent nothing for 1\.5 s") as info:
        Client([frozen.address], timeouts=netloader.Timeouts(stall=1.5)).load_into(
            dest, Identity("m")
        )
    assert time.monotonic() - start < 10
    assert info.value.completed == {"block.0"}


def test_sigstopped_server_times_out(start_server: StartServer) -> None:
    server = start_server("blocks", "--model", "m")
    dest = empty_like_set(blocks())
    server.proc.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with pytest.raises(TransferTimeout):
            Client([server.address], timeouts=netloader.Timeouts(connect=1, stall=1)).load_into(
                dest, Identity("m")
            )
        assert time.monotonic() - start < 5
    finally:
        server.proc.send_signal(signal.SIGCONT)


def test_no_reachable_source() -> None:
    dest = empty_like_set(transformer_like())
    start = time.monotonic()
    with pytest.raises(SourceUnavailable, match=r"cannot connect to 127\.0\.0\.1:1"):
        Client(["127.0.0.1:1"], timeouts=netloader.Timeouts(connect=2)).load_into(
            dest, Identity("m")
        )
    assert time.monotonic() - start < 5
    assert torch.all(dest["embed.weight"].view(torch.uint8) == SENTINEL)
