"""Streaming a checkpoint's tensors out of its sources a window at a time, for a consumer
that places them itself (an engine's `load_weights`, which shards and fuses them for its
own parallel layout). Memory stays bounded by two windows, not the whole model: the next
window is pulled while the consumer works through the current one."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from netloader.client.puller import Client
from netloader.errors import TransferError
from netloader.manifest import Manifest, TensorEntry
from netloader.tensors import dtype_from_name

DEFAULT_WINDOW_BYTES = 1 << 30


def windows(entries: Iterable[TensorEntry], window_bytes: int) -> list[list[TensorEntry]]:
    """`entries` in order, cut into runs of at most `window_bytes` (a larger tensor is a
    window of its own)."""
    out: list[list[TensorEntry]] = []
    size = 0
    for entry in entries:
        if not out or (size + entry.nbytes > window_bytes and out[-1]):
            out.append([])
            size = 0
        out[-1].append(entry)
        size += entry.nbytes
    return out


def stream_tensors(
    client: Client,
    manifest: Manifest,
    *,
    wanted: Callable[[str], bool] = lambda name: True,
    parts: Mapping[str, Sequence[Sequence[tuple[int, int]]]] | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for each tensor of `manifest` that `wanted` accepts, in
    manifest order, each verified, pulled by `client` from sources that serve exactly
    `manifest`. The tensors are fresh host memory the consumer may keep.

    client:       the Client whose sources to pull from (striped as it is configured).
    manifest:     the manifest one of them offered (`client.manifest()`).
    wanted:       which tensor names to pull (e.g. those of this pipeline stage).
    parts:        for the tensors it names, the parts to pull, each a box of [start, stop)
                  index ranges for the leading dimensions (rows; rows and columns): the
                  shard a tensor-parallel rank keeps. Only the chunks holding them move,
                  verified whole; the bytes no chunk brought are NaN (floating point) or
                  zero, so that a consumer reading outside its parts shows.
    window_bytes: how much to pull at a time; two windows are in memory at most.
    progress:     called with the byte count of each verified chunk.

    Raises a TransferError for a window that did not arrive; its message says which
    window, and the tensors of earlier windows have been yielded already.
    """
    selected = [t for t in manifest.tensors if wanted(t.name)]
    cuts = windows(selected, window_bytes)
    index = {t.name: i for i, t in enumerate(manifest.tensors)}
    parts = parts or {}

    def pull(number: int) -> dict[str, torch.Tensor]:
        dest, chunks = {}, set()
        for entry in cuts[number]:
            dtype = dtype_from_name(entry.dtype)
            if entry.name in parts:
                blank = float("nan") if dtype.is_floating_point or dtype.is_complex else 0
                dest[entry.name] = torch.full(entry.shape, blank, dtype=dtype)
                for box in parts[entry.name]:
                    chunks.update(manifest.chunks_covering(index[entry.name], box))
            else:
                dest[entry.name] = torch.empty(entry.shape, dtype=dtype)
                chunks.update(manifest.chunks_of(index[entry.name]))
        try:
            client.load_into(
                dest, manifest.identity, within=manifest, chunks=chunks, progress=progress
            )
        except TransferError as exc:
            raise type(exc)(
                f"window {number + 1} of {len(cuts)}: {exc}", source=exc.source
            ) from exc
        return dest

    with ThreadPoolExecutor(1, thread_name_prefix="netloader-window") as ahead:
        coming: Future[dict[str, torch.Tensor]] | None = ahead.submit(pull, 0) if cuts else None
        for number in range(len(cuts)):
            assert coming is not None
            current = coming.result()
            coming = ahead.submit(pull, number + 1) if number + 1 < len(cuts) else None
            yield from current.items()
            del current
