"""Device tensors end to end, on a CUDA machine (`pytest -m gpu`; scripts/gpu_check.sh runs
them): the device digest against its CPU reference, pulls into CUDA tensors over tcp (the
client's ring) and CUDA IPC from servers holding CUDA tensors (the server's ring, the
exports), bit-identical; a byte flipped in the server's device memory after its digests
is rejected on both paths; a server killed mid-pull; host memory bounded by the rings while
GiBs of device tensors move. Skipped, with the reason, where torch sees no CUDA device."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch

from netloader import Client, Identity, IntegrityError
from netloader import device_digest as dd
from netloader.client import sink as client_sink
from netloader.manifest import Manifest
from netloader.server import holdings
from netloader.testing.models import blocks, differing, mixed_sizes, transformer_like
from netloader.testing.processes import ServerProcess
from support.servers import Servers, StartServer, pull_while_killing_the_first

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is false): "
        "run scripts/gpu_check.sh on a GPU machine",
    ),
]
SECRET = "a shared secret of decent length"
VICTIM = "layers.2.attn.qkv"
MIB = 1 << 20


def on_cuda(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Empty contiguous CUDA destinations of the same names, dtypes and shapes."""
    return {n: torch.empty(t.shape, dtype=t.dtype, device="cuda") for n, t in tensors.items()}


def to_host(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.cpu() for n, t in tensors.items()}


def peer_args(model_set: str, *more: str) -> tuple[str, ...]:
    return (model_set, "--model", "m", "--device", "cuda", "--secret", SECRET, *more)


@pytest.fixture(scope="module")
def cuda_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """transformer_like() served from CUDA tensors, with a secret, 128 KiB chunks, column
    tiles (strided pieces)."""
    servers = Servers(tmp_path_factory.mktemp("gpu-servers"))
    yield servers.peer(
        *peer_args("transformer_like", "--chunk-bytes", str(128 << 10), "--column-tiles", "2")
    )
    servers.close()


# ---- the device digest --------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 3, 4, 5, 4097, MIB + 3, 64 * MIB + 1])
def test_device_digest_on_cuda_is_the_cpu_reference(length: int) -> None:
    host = torch.randint(0, 256, (length + 1,), dtype=torch.uint8)
    device = host.cuda()
    for start in (0, 1):  # aligned, and one byte on (copied before viewing as words)
        expected = dd.device_digest(host[start : start + length])
        assert dd.device_digest(device[start : start + length]) == expected
        assert dd.device_digest(device[start : start + length], dd.fused()) == expected


def test_device_digest_of_pieces_on_cuda() -> None:
    matrix = torch.randint(0, 256, (300, 64), dtype=torch.uint8)
    parts = [matrix[:7].reshape(-1), matrix[10:, 8:40]]  # a slice and a strided piece
    assert dd.chunk_digest([p.cuda() for p in parts]) == dd.chunk_digest(parts)


# ---- pulls into CUDA tensors ------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "cuda-ipc", "auto"])
def test_pull_into_cuda_tensors_is_bit_identical(
    cuda_server: ServerProcess, transport: str
) -> None:
    expected = transformer_like()
    dest = on_cuda(expected)
    client = Client([cuda_server.address], secret=SECRET.encode(), transport=transport)
    report = client.load_into(dest, Identity("m"))
    assert not differing(to_host(dest), expected)
    assert report.transport == ("tcp" if transport == "tcp" else "cuda-ipc")


def test_a_server_of_cuda_tensors_serves_host_destinations(cuda_server: ServerProcess) -> None:
    """The server's chunks of device tensors go through its ring of pinned buffers."""
    expected = transformer_like()
    dest = {n: torch.empty_like(t) for n, t in expected.items()}
    Client([cuda_server.address], secret=SECRET.encode(), transport="tcp").load_into(
        dest, Identity("m")
    )
    assert not differing(dest, expected)


def test_the_server_manifest_carries_device_digests(cuda_server: ServerProcess) -> None:
    manifest = Client([cuda_server.address], secret=SECRET.encode()).manifest()
    assert len(manifest.device_digests) == manifest.chunk_total


@pytest.mark.parametrize("transport", ["tcp", "cuda-ipc"])
def test_odd_lengths_and_coalesced_chunks(start_server: StartServer, transport: str) -> None:
    """Thousands of tiny tensors of odd lengths, every dtype, shared chunks."""
    server = start_server(*peer_args("mixed_sizes", "--chunk-bytes", str(256 << 10)))
    expected = {n: t.contiguous() for n, t in mixed_sizes().items()}
    dest = on_cuda(expected)
    report = Client([server.address], secret=SECRET.encode(), transport=transport).load_into(
        dest, Identity("m")
    )
    assert not differing(to_host(dest), expected)
    assert report.transport == transport


def test_without_a_secret_auto_does_not_hand_out_device_memory(
    start_server: StartServer,
) -> None:
    server = start_server("transformer_like", "--model", "m", "--device", "cuda")
    expected = transformer_like()
    dest = on_cuda(expected)
    report = Client([server.address], transport="auto").load_into(dest, Identity("m"))
    assert not differing(to_host(dest), expected)
    assert report.transport != "cuda-ipc"


# ---- failures -----------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "cuda-ipc"])
def test_a_byte_flipped_in_server_device_memory_is_rejected(
    start_server: StartServer, transport: str
) -> None:
    server = start_server(*peer_args("transformer_like", "--flip-after-digests", VICTIM))
    expected = transformer_like()
    dest = on_cuda(expected)
    client = Client([server.address], secret=SECRET.encode(), transport=transport)
    with pytest.raises(IntegrityError, match=f"{VICTIM}.*digest mismatch") as info:
        client.load_into(dest, Identity("m"))
    assert VICTIM not in info.value.completed
    got = to_host(dest)
    for name in info.value.completed:  # whatever was accepted is right
        assert not differing({name: got[name]}, {name: expected[name]})


# ---- host memory while GiBs of device tensors move ----------------------------------------

DEVICE_GIB = 4


def status_kib(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def reset_peak(pid: int | str) -> None:
    """Start VmHWM (the peak resident set) afresh from the current VmRSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    servers = Servers(tmp_path_factory.mktemp("gpu-big"))
    yield servers.peer(
        *peer_args(
            "transformer_like", "--device-gib", str(DEVICE_GIB), "--chunk-bytes", str(16 * MIB)
        )
    )
    servers.close()


@pytest.mark.parametrize("transport", ["tcp", "cuda-ipc"])
def test_host_memory_stays_within_the_rings(big_server: ServerProcess, transport: str) -> None:
    """4 GiB of CUDA tensors move from a server process into this one; the peak resident
    set of each grows by at most its ring (16 MiB chunks) plus 160 MiB."""
    client = Client([big_server.address], secret=SECRET.encode(), transport=transport)
    manifest: Manifest = client.manifest()
    assert manifest.total_bytes >= DEVICE_GIB << 30
    dest = {
        t.name: torch.empty(t.shape, dtype=getattr(torch, t.dtype), device="cuda")
        for t in manifest.tensors
    }
    chunk = manifest.largest_chunk
    torch.cuda.synchronize()
    pids = {"client": "self", "server": big_server.pid}
    before = {side: status_kib(pid, "VmRSS") for side, pid in pids.items()}
    for pid in pids.values():
        reset_peak(pid)
    report = client.load_into(dest, Identity("m"))
    torch.cuda.synchronize()
    grew = {side: status_kib(pid, "VmHWM") - before[side] for side, pid in pids.items()}
    allowed = {
        "client": client_sink.RING_SLOTS * chunk // 1024 + 160 * 1024,
        "server": holdings.RING_SLOTS * chunk // 1024 + 160 * 1024,
    }
    print(f"{transport}: {report.summary()}; peak RSS growth (KiB) {grew}, allowed {allowed}")
    assert report.bytes == manifest.total_bytes
    assert report.transport == transport
    for side in pids:
        assert grew[side] <= allowed[side], (side, grew[side], allowed[side])


# ---- last: a server killed while a client may be reading its device memory ---------------
# (what a driver does with a dead exporter's memory is what this finds out; anything it
# breaks in this process then cannot spoil the tests above)


@pytest.mark.parametrize("transport", ["tcp", "cuda-ipc"])
def test_a_server_killed_mid_pull(start_server: StartServer, transport: str) -> None:
    """SIGKILL the first source once its first chunk is verified: the pull finishes from
    the second, bit-identical."""
    pull_while_killing_the_first(
        start_server,
        transport,
        peer_args=peer_args("blocks", "--chunk-bytes", str(MIB)),
        expected=blocks(),
        destination=on_cuda,
        readback=to_host,
        secret=SECRET.encode(),
    )
