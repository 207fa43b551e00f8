"""Where received chunks land, and the digest check that accepts them."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from netloader import metrics
from netloader.errors import IntegrityError, TransferTimeout
from netloader.manifest import Chunk, Manifest, digest
from netloader.tensors import advise_huge_pages, byte_view, flat_bytes, prefault

RING_SLOTS = 8  # chunks for device tensors in host memory at once (>= any transport's window)
RING_WAIT = 60.0  # seconds a chunk may wait for a free slot before the pull gives up


def on_device(tensor: torch.Tensor) -> bool:
    """Destinations that go through the ring: contiguous tensors in device memory."""
    return tensor.device.type != "cpu" and tensor.is_contiguous()


class Slot:
    """One host buffer of the ring, and the device copy out of it still in flight."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.copy_done: Any = None  # a device event, while a copy out of it may run

    def wait_copied(self) -> None:
        if self.copy_done is not None:
            self.copy_done.synchronize()
            self.copy_done = None


class DeviceRing:
    """A few (pinned, where a CUDA device is present) host buffers that chunks for device
    tensors land in. A chunk is verified in its slot, then copied to the device
    asynchronously while the next ones arrive; its slot is reused once that copy is done.
    Host memory stays at `slots` x the chunk size, however large the tensors."""

    def __init__(self, slots: int, slot_bytes: int, pinned: bool) -> None:
        self._free: queue.Queue[Slot] = queue.Queue()
        self._all = [Slot(slot_bytes, pinned) for _ in range(slots)]
        for slot in self._all:
            self._free.put(slot)

    def acquire(self) -> Slot:
        try:
            slot = self._free.get(timeout=RING_WAIT)
        except queue.Empty:
            raise TransferTimeout(
                f"no host buffer freed for a device chunk within {RING_WAIT:g} s"
            ) from None
        slot.wait_copied()
        return slot

    def release(self, slot: Slot, copy_done: Any = None) -> None:
        slot.copy_done = copy_done
        self._free.put(slot)

    def settle(self) -> None:
        """Wait for every device copy still in flight."""
        for slot in self._all:
            slot.wait_copied()


class VerifyingSink:
    """Chunks land in the caller's tensor memory when it is contiguous host memory; in a
    slot of a small host ring, copied to the device chunk by chunk, when it is contiguous
    device memory (`ringed`); else in a staging buffer copied in once the tensor is
    complete. A chunk counts only once its digest matches the manifest's, checked before
    any copy. Safe to use from several receiving threads at once: each chunk has one
    writer. Call `settle` before using device destinations.

    manifest:   the adopted manifest (with digests).
    dest:       name -> destination tensor, for the tensors of the manifest to receive.
    progress:   called with each verified chunk's byte count.
    huge_pages: ask Linux for 2 MiB pages on the destination memory.
    verified:   called with each chunk once it is verified *and in place* (a relay serves
                it from then on).
    ringed:     which destinations go through the ring (default: contiguous device
                tensors).
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
    ) -> None:
        self.manifest = manifest
        # By manifest index, for the tensors `dest` names (all, unless a subset is pulled).
        self.dest = {i: dest[t.name] for i, t in enumerate(manifest.tensors) if t.name in dest}
        self.ringed = {i for i, t in self.dest.items() if ringed(t)}
        self.staged = {
            i: i not in self.ringed and (t.device.type != "cpu" or not t.is_contiguous())
            for i, t in self.dest.items()
        }
        # Host memory each chunk lands in: the tensor itself, or its whole staging copy.
        self.views = {
            i: torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
            if self.staged[i]
            else flat_bytes(t)
            for i, t in self.dest.items()
            if i not in self.ringed
        }
        self.ring: DeviceRing | None = None
        self._slots: dict[tuple[int, int], Slot] = {}  # ringed chunks between arrival and check
        if self.ringed:
            largest = max(manifest.tensors[i].nbytes for i in self.ringed)
            pinned = torch.cuda.is_available()
            self.ring = DeviceRing(RING_SLOTS, min(manifest.chunk_bytes, largest), pinned)
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
        """The host memory `chunk`'s bytes go to (prefaulted, so page faults do not slow
        the transfer): for a ringed tensor a slot, held until the chunk is checked (a chunk
        fetched again after a failed source gets the same slot)."""
        if chunk.tensor in self.ringed:
            assert self.ring is not None
            key = (chunk.tensor, chunk.number)
            with self._lock:
                slot = self._slots.get(key)
            if slot is None:
                slot = self.ring.acquire()
                with self._lock:
                    self._slots[key] = slot
            return slot.buffer[: chunk.length]
        view = self._view(chunk)
        prefault(view)
        return view

    def _view(self, chunk: Chunk) -> torch.Tensor:
        if chunk.tensor in self.ringed:
            with self._lock:
                return self._slots[(chunk.tensor, chunk.number)].buffer[: chunk.length]
        return self.views[chunk.tensor][chunk.offset : chunk.offset + chunk.length]

    def settle(self) -> None:
        """Wait for the device copies still in flight (before the tensors are used)."""
        if self.ring is not None:
            self.ring.settle()

    def received(self, chunk: Chunk, arrived: str | None = None, source: str | None = None) -> None:
        """Accept `chunk` if its bytes match the manifest's digest (`arrived`: their digest
        as computed on the way in; None: hash the destination now); else IntegrityError
        naming `source`."""
        entry = self.manifest.tensors[chunk.tensor]
        if arrived is None:
            arrived = digest(byte_view(self._view(chunk)))
        if arrived != entry.digests[chunk.number]:
            self._free_slot(chunk)  # the device copy never happens
            metrics.INTEGRITY_FAILURES.inc()
            sender = f" from {source}" if source else ""
            raise IntegrityError(
                f"tensor {entry.name!r} chunk {chunk.number}{sender}: digest mismatch, "
                "bytes rejected",
                source=source,
            )
        metrics.RECEIVED_BYTES.inc(chunk.length)
        if chunk.tensor in self.ringed:
            self._to_device(chunk)
        with self._lock:
            self.done_chunks.add((chunk.tensor, chunk.number))
            self.bytes += chunk.length
            self.missing[chunk.tensor] -= 1
            tensor_complete = self.missing[chunk.tensor] == 0
            if self.progress is not None:
                self.progress(chunk.length)
        if not self.staged[chunk.tensor]:
            if self.verified is not None:  # a ringed chunk's copy is ordered before any read
                self.verified(chunk)
        elif tensor_complete:
            target = self.dest[chunk.tensor]
            target.copy_(self.views[chunk.tensor].view(target.dtype).reshape(target.shape))
            if self.verified is not None:  # staged bytes are servable only once in place
                for number in range(self.manifest.chunk_count(chunk.tensor)):
                    self.verified(self.manifest.chunk(chunk.tensor, number))

    def _to_device(self, chunk: Chunk) -> None:
        """Copy a verified chunk from its slot into the device tensor, without waiting; the
        slot is reused once the copy is done."""
        assert self.ring is not None
        with self._lock:
            slot = self._slots.pop((chunk.tensor, chunk.number))
        target = flat_bytes(self.dest[chunk.tensor])[chunk.offset : chunk.offset + chunk.length]
        target.copy_(slot.buffer[: chunk.length], non_blocking=True)
        copy_done = None
        if target.device.type == "cuda":
            copy_done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            copy_done.record(torch.cuda.current_stream(target.device))
        self.ring.release(slot, copy_done)

    def _free_slot(self, chunk: Chunk) -> None:
        if chunk.tensor in self.ringed:
            assert self.ring is not None
            with self._lock:
                slot = self._slots.pop((chunk.tensor, chunk.number), None)
            if slot is not None:
                self.ring.release(slot)

    def is_done(self, chunk: Chunk) -> bool:
        with self._lock:
            return (chunk.tensor, chunk.number) in self.done_chunks

    def completed(self) -> list[str]:
        """Names of the tensors whose every chunk arrived verified."""
        with self._lock:
            return [self.manifest.tensors[i].name for i, left in self.missing.items() if left == 0]
