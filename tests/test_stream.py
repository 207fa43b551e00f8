"""Streaming a served checkpoint's tensors a window at a time (what an engine's own
`load_weights` consumes for another parallel layout), over real sockets."""

from __future__ import annotations

import pytest
import torch

import netloader
from netloader import Client, TransferError
from netloader.client import stream_tensors
from netloader.testing.models import same_bytes, transformer_like


def test_every_wanted_tensor_arrives_in_order_window_by_window() -> None:
    model = transformer_like()
    with netloader.serve(model, "m") as server:
        client = Client([server.address])
        manifest = client.manifest()
        streamed = list(stream_tensors(client, manifest, window_bytes=1 << 20))
        assert [n for n, _ in streamed] == [t.name for t in manifest.tensors]
        assert all(same_bytes(t, model[n]) for n, t in streamed)
        layer_one = list(
            stream_tensors(client, manifest, wanted=lambda n: n.startswith("layers.1."))
        )
        assert [n for n, _ in layer_one] == [n for n in model if n.startswith("layers.1.")]


def test_sources_are_striped_and_one_with_other_bytes_is_refused() -> None:
    model = transformer_like()
    other = {n: t.clone() for n, t in model.items()}
    other["layers.0.mlp.up"].add_(1)
    with (
        netloader.serve(model, "m") as good,
        netloader.serve(model, "m") as also_good,
        netloader.serve(other, "m") as impostor,
    ):
        manifest = Client([good.address]).manifest()
        client = Client([impostor.address, good.address, also_good.address])
        streamed = dict(stream_tensors(client, manifest, window_bytes=4 << 20))
        assert all(same_bytes(streamed[n], t) for n, t in model.items())


def test_a_source_that_goes_away_ends_the_stream_naming_the_window() -> None:
    model = transformer_like()
    server = netloader.serve(model, "m")
    client = Client([server.address], timeouts=netloader.Timeouts(connect=2, stall=2))
    manifest = client.manifest()
    stream = stream_tensors(client, manifest, window_bytes=1 << 20)
    first_name, _ = next(stream)
    server.close()
    with pytest.raises(TransferError, match=r"window \d+ of \d+"):
        for _ in stream:
            pass
    assert first_name == manifest.tensors[0].name


def test_a_subset_names_only_tensors_of_the_manifest() -> None:
    with netloader.serve(transformer_like(), "m") as server:
        client = Client([server.address])
        manifest = client.manifest()
        with pytest.raises(netloader.UsageError, match="not in the manifest"):
            client.load_into({"nope": torch.zeros(1)}, manifest.identity, within=manifest)


def test_a_rank_pulls_only_the_chunks_holding_its_rows_verified() -> None:
    """What a tensor-parallel rank of a checkpoint client does: for the tensors it shards,
    only the chunks holding its rows move (verified whole); the rows it does not keep
    are NaN, so a consumer that reads them shows; a flipped byte in them is rejected."""
    model = transformer_like()
    up = "layers.0.mlp.up"  # 1024 rows of 512 bytes: 8 chunks of 128 rows
    with netloader.serve(model, "m", chunk_bytes=64 << 10) as server:
        client = Client([server.address])
        manifest = client.manifest()
        received: list[int] = []
        streamed = dict(
            stream_tensors(client, manifest, parts={up: [((500, 1024),)]}, progress=received.append)
        )
        assert all(same_bytes(streamed[n], t) for n, t in model.items() if n != up)
        assert same_bytes(streamed[up][384:], model[up][384:])  # chunks 3-7 of it
        assert bool(streamed[up][:384].isnan().all())
        whole = sum(t.numel() * t.element_size() for t in model.values())
        assert sum(received) == whole - 384 * 512

        model[up][600, 0] += 1  # memory gone bad after the digests were computed
        with pytest.raises(
            netloader.IntegrityError, match=r"chunk \d+ \(tensor 'layers.0.mlp.up'\)"
        ):
            dict(stream_tensors(client, manifest, parts={up: [((500, 1024),)]}))
        kept = dict(stream_tensors(client, manifest, parts={up: [((0, 128),)]}))
        assert same_bytes(kept[up][:128], model[up][:128])  # its chunk is still intact
