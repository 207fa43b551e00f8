"""Where received chunks land, and the digest check that accepts them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch

from netloader import metrics
from netloader.errors import IntegrityError
from netloader.manifest import Chunk, Manifest, digest
from netloader.tensors import advise_huge_pages, byte_view, flat_bytes, prefault


class VerifyingSink:
    """Chunks land in the caller's tensor memory when it is contiguous host memory, else in
    a staging buffer copied in once the tensor is complete. A chunk counts only once its
    digest matches the manifest's. Safe to use from several receiving threads at once:
    each chunk has one writer.

    manifest:   the adopted manifest (with digests).
    dest:       name -> destination tensor, for the tensors of the manifest to receive.
    progress:   called with each verified chunk's byte count.
    huge_pages: ask Linux for 2 MiB pages on the destination memory.
    verified:   called with each chunk once it is verified *and in place* (a relay serves
                it from then on).
    """

    def __init__(
        self,
        manifest: Manifest,
        dest: Mapping[str, torch.Tensor],
        *,
        progress: Callable[[int], None] | None = None,
        huge_pages: bool = False,
        verified: Callable[[Chunk], None] | None = None,
    ) -> None:
        self.manifest = manifest
        # By manifest index, for the tensors `dest` names (all, unless a subset is pulled).
        self.dest = {i: dest[t.name] for i, t in enumerate(manifest.tensors) if t.name in dest}
        self.staged = {
            i: t.device.type != "cpu" or not t.is_contiguous() for i, t in self.dest.items()
        }
        self.views = {
            i: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
            if self.staged[i]
            else flat_bytes(t)
            for i, t in self.dest.items()
        }
        if huge_pages:
            for view in self.views.values():
                advise_huge_pages(view)
        self.missing = {i: manifest.chunk_count(i) for i in self.dest}
        self.done_chunks: set[tuple[int, int]] = set()
        self.bytes = 0
        self.progress = progress
        self.verified = verified
        self._lock = threading.Lock()

    def destination(self, chunk: Chunk) -> torch.Tensor:
        """The memory `chunk`'s bytes go to (prefaulted, so page faults do not slow the
        transfer)."""
        view = self._view(chunk)
        prefault(view)
        return view

    def _view(self, chunk: Chunk) -> torch.Tensor:
        return self.views[chunk.tensor][chunk.offset : chunk.offset + chunk.length]

    def received(self, chunk: Chunk, arrived: str | None = None, source: str | None = None) -> None:
        """Accept `chunk` if its bytes match the manifest's digest (`arrived`: their digest
        as computed on the way in; None: hash the destination now); else IntegrityError
        naming `source`."""
        entry = self.manifest.tensors[chunk.tensor]
        if arrived is None:
            arrived = digest(byte_view(self._view(chunk)))
        if arrived != entry.digests[chunk.number]:
            metrics.INTEGRITY_FAILURES.inc()
            sender = f" from {source}" if source else ""
            raise IntegrityError(
                f"tensor {entry.name!r} chunk {chunk.number}{sender}: digest mismatch, "
                "bytes rejected",
                source=source,
            )
        metrics.RECEIVED_BYTES.inc(chunk.length)
        with self._lock:
            self.done_chunks.add((chunk.tensor, chunk.number))
            self.bytes += chunk.length
            self.missing[chunk.tensor] -= 1
            tensor_complete = self.missing[chunk.tensor] == 0
            if self.progress is not None:
                self.progress(chunk.length)
        if not self.staged[chunk.tensor]:
            if self.verified is not None:
                self.verified(chunk)
        elif tensor_complete:
            target = self.dest[chunk.tensor]
            target.copy_(self.views[chunk.tensor].view(target.dtype).reshape(target.shape))
            if self.verified is not None:  # staged bytes are servable only once in place
                for number in range(self.manifest.chunk_count(chunk.tensor)):
                    self.verified(self.manifest.chunk(chunk.tensor, number))

    def is_done(self, chunk: Chunk) -> bool:
        with self._lock:
            return (chunk.tensor, chunk.number) in self.done_chunks

    def completed(self) -> list[str]:
        """Names of the tensors whose every chunk arrived verified."""
        with self._lock:
            return [self.manifest.tensors[i].name for i, left in self.missing.items() if left == 0]
