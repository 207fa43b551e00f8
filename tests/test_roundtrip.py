"""Real server process, real sockets: every dtype and shape arrives bit-identical."""

from __future__ import annotations

import multiprocessing as mp
import time
from multiprocessing.queues import Queue

import pytest
import torch

import netloader
from netloader import Client, Identity
from netloader.client import stream_tensors
from netloader.manifest import MAX_PIECES
from netloader.testing.models import all_dtypes, mixed_sizes, same_bytes, transformer_like
from support.servers import StartServer
from support.tensors import empty_like_set


@pytest.mark.parametrize("transport", ["tcp", "same-host", "gloo", "nixl", "auto"])
def test_every_dtype_and_size_round_trips_bit_identical(
    start_server: StartServer, transport: str
) -> None:
    """Empty tensors, scalars, odd lengths, a tensor larger than a chunk, non-contiguous
    ones, and thousands of tiny ones sharing chunks, on every transport."""
    server = start_server("mixed_sizes", "--model", "m", "--chunk-bytes", str(256 << 10))
    expected = mixed_sizes()
    dest = empty_like_set(expected)
    manifest = Client([server.address]).manifest()
    assert max(len(c.pieces) for c in manifest.chunks) == MAX_PIECES  # coalesced
    assert any(len(c.pieces) == 1 and c.length < 256 << 10 for c in manifest.chunks)
    report = Client([server.address], transport=transport).load_into(dest, Identity("m"))
    assert report.tensors == len(expected)
    assert report.bytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert report.verified and report.sources == (server.address,)
    assert report.transport == {"auto": "same-host"}.get(transport, transport)
    for name, tensor in expected.items():
        assert same_bytes(dest[name], tensor), name
    # float8 types really were exercised where this torch has them
    assert any("float8" in name for name in expected) == hasattr(torch, "float8_e4m3fn")


@pytest.mark.parametrize("transport", ["tcp", "same-host", "gloo", "nixl"])
def test_column_tiles_round_trip_and_a_rank_pulls_only_its_columns(
    start_server: StartServer, transport: str
) -> None:
    """A server that cuts its matrices into column tiles (strided chunks) serves them
    whole, bit-identical, on every transport; a row-parallel shard (some columns of every
    row) moves only its tiles, verified, the rest left NaN."""
    server = start_server(
        "transformer_like", "--model", "m", "--chunk-bytes", str(64 << 10), "--column-tiles", "4"
    )
    expected = transformer_like()
    manifest = Client([server.address]).manifest()
    assert manifest.column_tiles == 4 and any(c.pieces[0].repeat > 1 for c in manifest.chunks)
    dest = empty_like_set(expected)
    client = Client([server.address], transport=transport)
    report = client.load_into(dest, Identity("m"))
    assert report.transport == transport
    assert all(same_bytes(dest[name], tensor) for name, tensor in expected.items())

    down = "layers.1.mlp.down"  # [256, 1024] bf16: tiles of 256 columns
    received: list[int] = []
    streamed = dict(
        stream_tensors(
            client, manifest, parts={down: [((0, 256), (512, 768))]}, progress=received.append
        )
    )
    assert same_bytes(streamed[down][:, 512:768], expected[down][:, 512:768])
    assert bool(streamed[down][:, :512].isnan().all() and streamed[down][:, 768:].isnan().all())
    whole = sum(t.numel() * t.element_size() for t in expected.values())
    assert sum(received) == whole - expected[down].nbytes * 3 // 4


def test_non_contiguous_destinations_are_filled(start_server: StartServer) -> None:
    server = start_server("all_dtypes", "--model", "m")
    expected = all_dtypes()
    dest = empty_like_set(expected)
    dest["transposed"] = torch.empty(64, 48).t()  # same shape, non-contiguous memory
    Client([server.address]).load_into(dest, Identity("m"))
    assert not dest["transposed"].is_contiguous()
    assert same_bytes(dest["transposed"], expected["transposed"])


def test_module_api_round_trip(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "tiny")
    expected = transformer_like()
    module = torch.nn.Module()
    for name, t in expected.items():  # an "empty model": parameters of the right shape
        holder = module
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(holder, part):
                holder.add_module(part, torch.nn.Module())
            holder = getattr(holder, part)
        holder.register_parameter(
            leaf, torch.nn.Parameter(torch.empty_like(t), requires_grad=False)
        )
    report = netloader.load(module, [server.address], identity="tiny")
    assert report.bytes == sum(t.nbytes for t in expected.values())
    for name, t in module.state_dict().items():
        assert same_bytes(t, expected[name]), name


def _pull_in_child(address: str, queue: Queue[bool | str]) -> None:
    try:
        expected = transformer_like()
        dest = empty_like_set(expected)
        Client([address]).load_into(dest, Identity("m"))
        queue.put(all(same_bytes(dest[n], t) for n, t in expected.items()))
    except Exception as exc:
        queue.put(repr(exc))


def test_eight_client_processes_at_once(start_server: StartServer) -> None:
    server = start_server("transformer_like", "--model", "m")
    ctx = mp.get_context("spawn")
    queue: Queue[bool | str] = ctx.Queue()
    clients = [ctx.Process(target=_pull_in_child, args=(server.address, queue)) for _ in range(8)]
    for c in clients:
        c.start()
    results = [queue.get(timeout=120) for _ in clients]
    for c in clients:
        c.join(timeout=30)
    assert results == [True] * 8
    deadline = time.monotonic() + 10  # the server logs each transfer just after its END
    while server.log_text().count("sent ") < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.log_text().count("sent ") == 8
