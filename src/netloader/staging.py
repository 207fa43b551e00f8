"""A small ring of host buffers (pinned where a CUDA device is present) that chunks of
device tensors pass through, on either side: the client receives a chunk into a slot,
verifies it there and copies it to the device; the server copies a chunk from the device
into a slot and sends it from there. Host memory stays at the ring's size, however large
the tensors."""

from __future__ import annotations

import queue
from typing import Any

import torch

from netloader.errors import TransferTimeout
from netloader.tensors import byte_view


def on_device(tensor: torch.Tensor) -> bool:
    """Destinations that go through the ring: contiguous tensors in device memory."""
    return not tensor.is_cpu and tensor.is_contiguous()


class Slot:
    """One host buffer of the ring, and the device copy out of it still in flight."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.view = byte_view(self.buffer)
        self.address = self.buffer.data_ptr()
        self.copy_done: Any = None  # a device event, while a copy out of it may run

    def wait_copied(self) -> None:
        if self.copy_done is not None:
            self.copy_done.synchronize()
            self.copy_done = None


class DeviceRing:
    """A few host buffers of `slot_bytes` (pinned: `pinned`) that chunks of device tensors
    pass through. A slot is taken for one chunk and given back with the device copy out of
    it that may still run (the client's); it is handed out again once that copy is done.
    Host memory stays at `slots` x `slot_bytes`, however large the tensors."""

    def __init__(self, slots: int, slot_bytes: int, pinned: bool) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._free: queue.Queue[Slot] = queue.Queue()
        self._all = [Slot(slot_bytes, pinned) for _ in range(slots)]
        for slot in self._all:
            self._free.put(slot)

    def acquire(self, wait: float) -> Slot:
        """A free slot, once its last device copy is done; TransferTimeout after `wait`
        seconds without one."""
        try:
            slot = self._free.get(timeout=wait)
        except queue.Empty:
            raise TransferTimeout(
                f"no host buffer freed for a device chunk within {wait:g} s"
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
