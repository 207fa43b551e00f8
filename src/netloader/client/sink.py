"""Where received chunks land, and the digest check that accepts them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Mapping

import torch

from netloader import metrics
from netloader.errors import IntegrityError
from netloader.manifest import Chunk, Manifest, digest_of
from netloader.staging import DeviceRing, Slot, on_device
from netloader.tensors import (
    address_of,
    advise_huge_pages_at,
    flat_bytes,
    memory_at,
    prefault_range,
)
from netloader.transports.base import Landing

RING_SLOTS = 8  # chunks for device tensors in host memory at once (>= any transport's window)
RING_WAIT = 60.0  # seconds a chunk may wait for a free slot before the pull gives up
# Pieces are prefaulted when they average at least this: smaller tensors share pages the
# allocator has already touched, and a call per piece would cost more than it saves.
PREFAULT_PIECES = 256 << 10


class VerifyingSink:
    """Chunks land in the caller's tensor memory when it is contiguous host memory; in a
    slot of a small host ring, copied to the device piece by piece, when it is contiguous
    device memory (`ringed`); else in a staging buffer copied in once the tensor is
    complete. Pieces of tensors the caller did not ask for (a chunk is verified whole)
    land in a scratch buffer, and so do strided pieces (column tiles, which arrive packed
    and are moved to their columns once verified). A chunk counts only once its digest
    matches the manifest's,
    checked before any copy. Safe to use from several receiving threads at once: each
    chunk has one writer. Call `settle` before using device destinations.

    manifest:   the adopted manifest (with digests).
    dest:       name -> destination tensor, for the tensors of the manifest to receive.
    progress:   called with each verified chunk's byte count.
    huge_pages: ask Linux for 2 MiB pages on the destination memory.
    verified:   called with each chunk once it is verified *and in place* (a relay serves
                it from then on); only for chunks whose every tensor is in `dest`.
    ringed:     which destinations go through the ring (default: contiguous device
                tensors).
    chunks:     fetch only these chunk numbers (parts of `dest`'s tensors, e.g. the rows
                a tensor-parallel rank keeps); the rest of those tensors is left as it is.
                None: all of every tensor in `dest`.
    """

    def __init__(
        self,
        manifest: Manifest,
        dest: Mapping[str, torch.Tensor],
        *,
        progress: Callable[[int], None] | None = None,
        huge_pages: bool = False,
        verified: Callable[[Chunk], None] | None = None,
        ringed: Callable[[torch.Tensor], bool] = on_device,
        chunks: Collection[int] | None = None,
    ) -> None:
        self.manifest = manifest
        # By manifest index, for the tensors `dest` names (all, unless a subset is pulled).
        self.dest = {i: dest[t.name] for i, t in enumerate(manifest.tensors) if t.name in dest}
        self.ringed = {i for i, t in self.dest.items() if ringed(t)}
        # Host memory each tensor's pieces land in: the tensor's own, or a staging buffer
        # (copied in once the tensor is complete) where it is not contiguous host memory.
        self.staged = {
            i: torch.empty(t.nbytes, dtype=torch.uint8)
            for i, t in self.dest.items()
            if not (t.is_cpu and t.is_contiguous()) and i not in self.ringed
        }
        self.bases = {
            i: self.staged.get(i, t).data_ptr()
            for i, t in self.dest.items()
            if i not in self.ringed
        }
        # The chunks to fetch: those holding any wanted tensor (of those asked for).
        self.wanted = [
            c
            for c in manifest.chunks
            if (chunks is None or c.number in chunks)
            and any(p.tensor in self.dest for p in c.pieces)
        ]
        self.ring: DeviceRing | None = None
        self._slots: dict[int, Slot] = {}  # ringed chunks, between arrival and check
        # Unwanted pieces, and strided ones (column tiles, which land packed), between
        # arrival and check.
        self._scratch: dict[int, bytearray] = {}
        self._landed: dict[int, Landing] = {}  # each chunk's landing, until it is checked
        # The ring is made at the first chunk that lands in it: a pull that copies device
        # to device (CUDA IPC) never needs one.
        self._ring_bytes = max((c.length for c in self.wanted if self._has_ringed(c)), default=0)
        if huge_pages:
            for i, base in self.bases.items():
                advise_huge_pages_at(base, manifest.tensors[i].nbytes)
        self.missing = dict.fromkeys(self.dest, 0)  # per tensor: its chunks still to come
        for chunk in self.wanted:
            for piece in chunk.pieces:
                if piece.tensor in self.missing:
                    self.missing[piece.tensor] += 1
        self.done_chunks: set[int] = set()
        self.bytes = 0
        self.progress = progress
        self.verified = verified
        self._lock = threading.Lock()
        self.device_type = "cuda"  # the device memory `device_targets` serves
        self._all_on_device: bool | None = None

    def _has_ringed(self, chunk: Chunk) -> bool:
        return any(p.tensor in self.ringed for p in chunk.pieces)

    def landing(self, chunk: Chunk) -> Landing:
        """Where `chunk`'s pieces go (host memory, prefaulted so that page faults do not
        slow the transfer). A ringed or partly unwanted chunk holds its slot or scratch
        buffer until it is checked; a chunk fetched again after a failed source gets the
        same one."""
        slot: Slot | None = None
        scratch: bytearray | None = None
        if self._has_ringed(chunk):
            with self._lock:
                slot = self._slots.get(chunk.number)
                if self.ring is None:
                    self.ring = DeviceRing(RING_SLOTS, self._ring_bytes, torch.cuda.is_available())
                ring = self.ring
            if slot is None:
                slot = ring.acquire(RING_WAIT)
                with self._lock:
                    self._slots[chunk.number] = slot
        if chunk.strided or any(p.tensor not in self.dest for p in chunk.pieces):
            with self._lock:
                scratch = self._scratch.setdefault(chunk.number, bytearray(chunk.length))
        landing = self._landing(chunk, slot, scratch)
        with self._lock:
            self._landed[chunk.number] = landing
        if len(chunk.pieces) == 1 or chunk.length >= PREFAULT_PIECES * len(chunk.pieces):
            for piece, address in zip(chunk.pieces, landing.addresses, strict=True):
                if piece.tensor in self.bases and piece.repeat == 1:
                    prefault_range(address, piece.length)
        return landing

    def _landing(self, chunk: Chunk, slot: Slot | None, scratch: bytearray | None) -> Landing:
        views: list[memoryview] = []
        addresses: list[int] = []
        position = 0  # within the chunk (where a piece sits in a slot or the scratch)
        for piece in chunk.pieces:
            size = piece.nbytes
            if piece.tensor in self.bases and piece.repeat == 1:
                address = self.bases[piece.tensor] + piece.offset
                views.append(memory_at(address, size))
                addresses.append(address)
            elif piece.tensor in self.ringed:
                assert slot is not None
                views.append(slot.view[position : position + size])
                addresses.append(slot.address + position)
            else:  # unwanted, or strided (moved into place once verified)
                assert scratch is not None
                views.append(memoryview(scratch)[position : position + size])
                addresses.append(address_of(scratch) + position)
            position += size
        return Landing(views, addresses)

    def settle(self) -> None:
        """Wait for the device copies still in flight (before the tensors are used)."""
        if self.ring is not None:
            self.ring.settle()

    def received(self, chunk: Chunk, arrived: str | None = None, source: str | None = None) -> None:
        """Accept `chunk` if its bytes match the manifest's digest (`arrived`: their digest
        as computed on the way in; None: hash the landed bytes now); else IntegrityError
        naming `source` and the chunk's tensors."""
        with self._lock:
            slot = self._slots.pop(chunk.number, None)
            scratch = self._scratch.pop(chunk.number, None)
            landing = self._landed.pop(chunk.number, None)
        if arrived is None:
            arrived = digest_of((landing or self._landing(chunk, slot, scratch)).views)
        if arrived != self.manifest.digests[chunk.number]:
            if slot is not None:
                self.ring.release(slot)  # type: ignore[union-attr]  # no device copy
            raise self._mismatch(chunk, source)
        metrics.RECEIVED_BYTES.inc(chunk.length)
        if scratch is not None:
            self._unpack(chunk, scratch)
        if slot is not None:
            self._to_device(chunk, slot)
        self._accept(chunk)

    def _mismatch(self, chunk: Chunk, source: str | None, what: str = "digest") -> IntegrityError:
        metrics.INTEGRITY_FAILURES.inc()
        sender = f" from {source}" if source else ""
        return IntegrityError(
            f"chunk {chunk.number} ({self.manifest.describe_chunk(chunk)}){sender}: "
            f"{what} mismatch, bytes rejected",
            source=source,
        )

    # ---- chunks copied device to device (CUDA IPC) ------------------------------------------
    def device_targets(self, chunk: Chunk) -> list[torch.Tensor] | None:
        """Where each of `chunk`'s pieces goes in device memory (uint8; a strided piece as
        its (rows, length) runs), for a transport that copies device to device; None
        unless every piece goes straight into a contiguous destination on a device of
        type `device_type` (CUDA) and the manifest has device digests to verify it with."""
        if not self.manifest.device_digests or not all(
            p.tensor in self.ringed and self.dest[p.tensor].device.type == self.device_type
            for p in chunk.pieces
        ):
            return None
        return [p.of(flat_bytes(self.dest[p.tensor])) for p in chunk.pieces]

    def all_on_device(self) -> bool:
        """Whether every chunk to fetch can go device to device: its pieces all into
        contiguous CUDA destinations, and the manifest carries device digests."""
        if self._all_on_device is None:
            self._all_on_device = bool(self.manifest.device_digests) and all(
                self.device_targets(chunk) is not None for chunk in self.wanted
            )
        return self._all_on_device

    def device_received(self, chunk: Chunk, arrived: str, source: str | None = None) -> None:
        """Accept `chunk`, copied into its `device_targets`, if `arrived` (the device digest
        of the bytes there) matches the manifest's; else IntegrityError (the chunk stays
        missing: its tensors are not complete, and another source may send it again)."""
        if not self.manifest.device_digests:
            raise IntegrityError(
                f"chunk {chunk.number}: the manifest has no device digests", source=source
            )
        if arrived != self.manifest.device_digests[chunk.number]:
            raise self._mismatch(chunk, source, "device digest")
        metrics.RECEIVED_BYTES.inc(chunk.length)
        self._accept(chunk)

    def _accept(self, chunk: Chunk) -> None:
        """Count a verified chunk, in place: copy in the staged tensors it completed, and
        tell `verified` of what became servable."""
        completed = []  # tensors servable only whole that this chunk completed
        with self._lock:
            self.done_chunks.add(chunk.number)
            self.bytes += chunk.length
            for piece in chunk.pieces:
                if piece.tensor in self.missing:
                    self.missing[piece.tensor] -= 1
                    if self.missing[piece.tensor] == 0 and self._served_whole(piece.tensor):
                        completed.append(piece.tensor)
            if self.progress is not None:
                self.progress(chunk.length)
        for index in completed:
            if index in self.staged:
                target = self.dest[index]
                target.copy_(self.staged[index].view(target.dtype).reshape(target.shape))
        if self.verified is not None:
            if self.ring is not None and any(i in self.ringed for i in completed):
                # A relay serves a completed device tensor at once, from the device (by
                # its ring, or CUDA IPC from another process): its copies must be done.
                self.ring.settle()
            self._notify(chunk, completed)

    def _served_whole(self, tensor: int) -> bool:
        """Whether a relay serves `tensor` only once all of it arrived: a staged tensor is
        in place only then, and a server copies a device tensor to host memory whole, at
        the first request (a part copied earlier would be stale)."""
        return tensor in self.staged or tensor in self.ringed

    def _notify(self, chunk: Chunk, completed: list[int]) -> None:
        """Tell `verified` of the chunks that became servable: this one, and those of the
        tensors served whole that it completed (see `_served_whole`)."""
        assert self.verified is not None
        candidates = {chunk.number}
        for index in completed:
            candidates.update(self.manifest.chunks_of(index))
        for number in sorted(candidates):
            candidate = self.manifest.chunks[number]
            with self._lock:
                ready = number in self.done_chunks and all(
                    p.tensor in self.dest
                    and (not self._served_whole(p.tensor) or self.missing[p.tensor] == 0)
                    for p in candidate.pieces
                )
            if ready:
                self.verified(candidate)

    def _unpack(self, chunk: Chunk, scratch: bytearray) -> None:
        """Copy a verified chunk's strided pieces (column tiles) from the scratch buffer,
        where they landed packed, into their tensors' host memory."""
        position = 0
        for piece in chunk.pieces:
            if piece.repeat > 1 and piece.tensor in self.bases:
                packed = torch.frombuffer(
                    scratch, dtype=torch.uint8, offset=position, count=piece.nbytes
                )
                host = self.staged.get(piece.tensor)
                if host is None:
                    host = flat_bytes(self.dest[piece.tensor])
                piece.of(host).copy_(packed.view(piece.repeat, piece.length))
            position += piece.nbytes

    def _to_device(self, chunk: Chunk, slot: Slot) -> None:
        """Copy a verified chunk's ringed pieces from its slot into their device tensors,
        without waiting; the slot is reused once the copies are done."""
        assert self.ring is not None
        position = 0
        target: torch.Tensor | None = None
        for piece in chunk.pieces:
            if piece.tensor in self.ringed:
                target = piece.of(flat_bytes(self.dest[piece.tensor]))
                packed = slot.buffer[position : position + piece.nbytes]
                target.copy_(packed.view(target.shape), non_blocking=True)
            position += piece.nbytes
        copy_done = None
        if target is not None and target.device.type == "cuda":
            copy_done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copy_done.record(torch.cuda.current_stream(target.device))
        self.ring.release(slot, copy_done)

    def is_done(self, chunk: Chunk) -> bool:
        with self._lock:
            return chunk.number in self.done_chunks

    def completed(self) -> list[str]:
        """Names of the tensors whose every chunk asked for arrived verified (with
        `chunks`, the parts asked for)."""
        with self._lock:
            return [self.manifest.tensors[i].name for i, left in self.missing.items() if left == 0]
