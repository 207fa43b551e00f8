"""The same-host transport with real processes: the client copies chunks out of the
server's memory (process_vm_readv) and still verifies every one; whatever stops the fast
path (a proxy in between, no permission, another pid namespace) falls back to DATA frames
on the same connection with one log line, unless TRANSPORT=same-host forces it."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from safetensors.torch import load_file

from netloader import Client, Identity, IntegrityError
from netloader.testing.models import differing, mixed_sizes, same_bytes, transformer_like
from netloader.transports import process_memory
from support.servers import NETLOADER, MakeProxy, StartServer, pull_while_killing_the_first
from support.tensors import empty_like_set

pytestmark = pytest.mark.skipif(
    process_memory.unsupported() is not None, reason=str(process_memory.unsupported())
)
VICTIM = "layers.2.attn.qkv"
REFUSED = "same-host path refused"


@pytest.mark.parametrize("transport", ["same-host", "tcp"])
def test_bytes_flipped_in_the_servers_memory_are_rejected(
    start_server: StartServer, transport: str
) -> None:
    """The server computed its digests, then a byte of its memory changed: reading the
    memory directly does not skip the check."""
    server = start_server("transformer_like", "--model", "m", "--flip-after-digests", VICTIM)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with pytest.raises(IntegrityError, match=f"{VICTIM}.*digest mismatch") as info:
        Client([server.address], transport=transport).load_into(dest, Identity("m"))
    assert VICTIM not in info.value.completed
    for name in info.value.completed:  # whatever was accepted is right
        assert same_bytes(dest[name], expected[name])


@pytest.mark.parametrize("transport", ["same-host", "tcp"])
def test_a_byte_flipped_inside_a_coalesced_chunk_is_rejected_naming_its_tensors(
    start_server: StartServer, transport: str
) -> None:
    """One tiny tensor among the thousand that share a chunk changed after the digests:
    the chunk is refused, the message names the tensors it holds, and every tensor
    accepted (those of other chunks) is right."""
    victim = "tiny.1500"
    server = start_server(
        "mixed_sizes",
        "--model",
        "m",
        "--chunk-bytes",
        str(256 << 10),
        "--flip-after-digests",
        victim,
    )
    expected = mixed_sizes()
    dest = empty_like_set(expected)
    with pytest.raises(
        IntegrityError, match=r"chunk \d+ \(tensors 'tiny\.\d+' \.\.\. 'tiny\.\d+'"
    ) as info:
        Client([server.address], transport=transport).load_into(dest, Identity("m"))
    first, last = re.search(r"'tiny\.(\d+)' \.\.\. 'tiny\.(\d+)'", str(info.value)).groups()  # type: ignore[union-attr]
    assert int(first) <= 1500 <= int(last)
    assert victim not in info.value.completed and info.value.completed
    for name in info.value.completed:
        assert same_bytes(dest[name], expected[name])


def test_through_a_proxy_the_bytes_come_over_tcp(
    start_server: StartServer, proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """Same boot id, but the server does not see this end's address: something sits in
    between, and the client does not read the memory of a process it is not talking to."""
    server = start_server("transformer_like", "--model", "m", "--chunk-bytes", str(256 << 10))
    relay = proxy(server.address)
    expected = transformer_like()
    dest = empty_like_set(expected)
    with caplog.at_level(logging.WARNING):
        report = Client([relay.address], stripe=1).load_into(dest, Identity("m"))
    assert report.transport == "tcp"
    assert not differing(dest, expected)
    refusals = [r.getMessage() for r in caplog.records if REFUSED in r.getMessage()]
    assert len(refusals) == 1, refusals  # once per connection, not per FETCH
    assert "not a direct connection" in refusals[0]


# A client the kernel will not let read the server: another user (no CAP_SYS_PTRACE), or
# another pid namespace (the server's pid means nothing there).
OTHER_USER = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
OTHER_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--kill-child"]


@pytest.fixture
def writable_by_all() -> Iterator[Path]:
    """A directory another user can write to (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="netloader-test-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _runnable(prefix: list[str]) -> bool:
    if os.geteuid() != 0 or shutil.which(prefix[0]) is None:
        return False
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.parametrize(
    ("prefix", "reason"),
    [
        (OTHER_USER, "cannot read the server's memory.*Operation not permitted"),
        (OTHER_PID_NAMESPACE, "not visible here"),
    ],
    ids=["other-user", "other-pid-namespace"],
)
def test_a_client_that_may_not_read_falls_back_to_tcp(
    start_server: StartServer, writable_by_all: Path, prefix: list[str], reason: str
) -> None:
    if not _runnable(prefix):
        pytest.skip(f"needs root and a working {prefix[0]}")
    server = start_server("transformer_like", "--model", "m")
    tmp_path = writable_by_all
    pull = [NETLOADER, "pull", server.address, "--model", "m"]

    automatic = subprocess.run(
        [*prefix, *pull, "--out", str(tmp_path / "auto")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert automatic.returncode == 0, automatic.stderr
    refusals = [line for line in automatic.stderr.splitlines() if REFUSED in line]
    assert len(refusals) == 1, automatic.stderr
    assert re.search(reason, refusals[0]), refusals[0]
    assert f"from {server.address} over tcp, verified" in automatic.stdout
    got = load_file(tmp_path / "auto" / "model.safetensors")
    assert not differing(got, transformer_like())

    forced = subprocess.run(
        [*prefix, *pull, "--out", str(tmp_path / "forced"), "--transport", "same-host"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert forced.returncode != 0
    assert "pull incomplete (0 of" in forced.stderr
    assert re.search(reason, forced.stderr), forced.stderr
    assert not (tmp_path / "forced" / "model.safetensors").exists()


def test_a_server_killed_while_the_client_reads_it(start_server: StartServer) -> None:
    """The first source dies after the first chunk was read: its memory is gone, the
    client names why and takes the rest from the second source, bit-identical."""
    report, killed = pull_while_killing_the_first(start_server, "same-host")
    assert report.transport == "same-host"
    assert len(report.failures) == 1 and killed in report.failures[0]


def test_an_authenticated_same_host_pull(start_server: StartServer) -> None:
    secret = "a secret of a decent length for both"
    server = start_server("transformer_like", "--model", "m", "--secret", secret)
    expected = transformer_like()
    dest = empty_like_set(expected)
    report = Client([server.address], secret=secret.encode()).load_into(dest, Identity("m"))
    assert report.transport == "same-host"
    assert not differing(dest, expected)
