"""The server's bytes arrive wrong: a flipped byte on the way, or a second source that
holds other contents. Nothing wrong is ever accepted; the pull fails over to a source
that holds the right bytes, or stops rather than mixing two models."""

from __future__ import annotations

import pytest

from netloader import Client, Identity, IntegrityError, TransferError
from netloader.settings import Timeouts
from netloader.testing.models import same_bytes, transformer_like
from support.servers import MakeProxy, StartServer
from support.tensors import empty_like_set

MIB = 1 << 20


@pytest.mark.parametrize("offset", [200_000, 3 * MIB + 17])
def test_flipped_byte_is_detected_and_never_accepted(
    start_server: StartServer, proxy: MakeProxy, offset: int
) -> None:
    server = start_server("transformer_like", "--model", "m")
    bad = proxy(server.address, flip_at=offset)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with pytest.raises(IntegrityError, match="digest mismatch, bytes rejected") as info:
        Client([bad.address]).load_into(dest, Identity("m"))
    completed = info.value.completed
    assert len(completed) < len(expected)
    for name in completed:  # whatever was accepted is right
        assert same_bytes(dest[name], expected[name])


def test_failover_resumes_from_next_source(start_server: StartServer, proxy: MakeProxy) -> None:
    server = start_server("transformer_like", "--model", "m")
    bad = proxy(server.address, flip_at=2 * MIB)
    good = start_server("transformer_like", "--model", "m")
    expected = transformer_like()
    dest = empty_like_set(expected)
    report = Client([bad.address, good.address], stripe=1).load_into(dest, Identity("m"))
    assert report.sources == (bad.address, good.address)  # the first delivered part
    assert len(report.failures) == 1 and "digest mismatch" in report.failures[0]
    total = sum(t.nbytes for t in expected.values())
    assert report.bytes == total
    sent = dict(report.bytes_by_source)[good.address]
    assert 0 < sent < total  # the second source sent only what the first had not
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_sources_with_different_contents_are_never_mixed(
    start_server: StartServer, proxy: MakeProxy
) -> None:
    """Source 1 dies halfway; source 2 serves the same names and shapes but other bytes.
    Taking the rest from it would silently mix two models: refused."""
    first = start_server("transformer_like", "--model", "m")
    cut = proxy(first.address, freeze_after=2 * MIB)
    other = start_server("transformer_like", "--model", "m", "--mutate", "layers.3.mlp.down")
    dest = empty_like_set(transformer_like())
    with pytest.raises(TransferError, match="content differs from the first source") as info:
        Client([cut.address, other.address], timeouts=Timeouts(stall=1), stripe=1).load_into(
            dest, Identity("m")
        )
    assert "layers.3.mlp.down" not in info.value.completed
