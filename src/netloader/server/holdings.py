"""What a server hands out: a manifest, and the bytes of each chunk once it holds them.

Three kinds: `LoadedTensors`, a model that is fully in memory (its digests computed in the
background or given); `PartOfModel`, some tensors of a model whose whole manifest is
known (what an instance took of a new version: it relays that delta); and `Arrivals`, a
model still being received by a relaying client, whose chunks become servable one by one
as they arrive verified. A server over `Arrivals` lets a wave of new instances form a
chain: each hands on what it has while it is still receiving the rest.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping
from typing import NamedTuple, Protocol

import torch

from netloader.errors import SourceUnavailable, UsageError
from netloader.manifest import (
    DEFAULT_CHUNK_BYTES,
    MAX_COLUMN_TILES,
    Chunk,
    Identity,
    Manifest,
    build_manifest,
    digest_of,
)
from netloader.staging import DeviceRing, Slot, on_device
from netloader.tensors import flat_bytes, memory_at, owned_view

log = logging.getLogger(__name__)

RING_SLOTS = 4  # chunks of device tensors in host memory at once, for all connections
RING_WAIT = 30.0  # seconds a sender may wait for a free slot before the transfer fails


class Holdings(Protocol):
    @property
    def complete(self) -> bool:
        """Whether it offers every chunk of its manifest (what a client loading a whole
        model needs; a PartOfModel of some tensors does not)."""

    def prepare(self) -> None:
        """Begin any background work (called once the server is listening)."""

    def manifest(self, timeout: float) -> Manifest:
        """The manifest to offer; SourceUnavailable if there is none to offer (in time)."""

    def host(self, index: int) -> HostTensor:
        """The bytes of the manifest's tensor `index` in host memory (call after
        `manifest`, and for a chunk of it only once `wait_for` returned)."""

    def tensor(self, index: int) -> torch.Tensor:
        """The manifest's tensor `index` itself, wherever it is (call after `manifest`);
        SourceUnavailable if this server does not hold it."""

    def views(self, chunk: Chunk) -> tuple[list[memoryview], Slot | None]:
        """`chunk`'s pieces in host memory, in order (once `wait_for` returned): views of
        the tensors' host bytes, a strided piece packed, a device tensor's piece copied
        into a slot of the ring (returned: `release` it once the views are sent)."""

    def release(self, slot: Slot) -> None:
        """Give back a slot `views` returned."""

    def wait_for(self, chunk: Chunk, timeout: float) -> None:
        """Return once `chunk`'s bytes are held and verified; SourceUnavailable if they
        will not be (in time)."""


class HostTensor(NamedTuple):
    """A tensor's bytes in host memory: flat, as a view, and their address."""

    flat: torch.Tensor
    view: memoryview
    address: int


class HostBytes:
    """Tensors' bytes in host memory, shared by every connection.

    `bytes_of`: a tensor's bytes, flat: a view of a contiguous CPU tensor; for any other
    (non-contiguous, or on a device), one copy made on first use, so concurrent clients
    never multiply it (the transports that read memory at addresses need it whole).
    `chunk_views`: one chunk's bytes for a sender (tcp): the pieces of `ringed` tensors
    (contiguous device tensors) are copied into a slot of a ring of `slots` host buffers
    (pinned where CUDA is present) and sent from there, so host memory stays at the ring's
    size however large the device tensors are, and no device tensor is copied whole."""

    def __init__(
        self, ringed: Callable[[torch.Tensor], bool] | None = None, slots: int = RING_SLOTS
    ) -> None:
        self._made: dict[int, HostTensor] = {}
        self._lock = threading.Lock()
        self.ringed = on_device if ringed is None else ringed
        self.slots = slots
        self.ring: DeviceRing | None = None  # made at the first chunk of a ringed tensor

    def bytes_of(self, index: int, tensor_of: Callable[[int], torch.Tensor]) -> HostTensor:
        """Tensor `index`'s host bytes (`tensor_of(index)` is the tensor, asked once)."""
        made = self._made.get(index)
        if made is not None:
            return made
        with self._lock:
            made = self._made.get(index)
            if made is None:
                flat = flat_bytes(tensor_of(index).detach()).cpu()
                made = self._made[index] = HostTensor(
                    flat, memory_at(flat.data_ptr(), flat.numel()), flat.data_ptr()
                )
            return made

    def chunk_views(
        self, chunk: Chunk, tensor_of: Callable[[int], torch.Tensor], slot_bytes: int
    ) -> tuple[list[memoryview], Slot | None]:
        """`chunk`'s pieces in host memory (see the class), and the slot holding its ringed
        pieces, if any, to `release` once they are sent. `slot_bytes`: the largest chunk
        (the slots' size, fixed at the first use)."""
        made = [self._made.get(p.tensor) for p in chunk.pieces]
        if all(host is not None for host in made) and not chunk.strided:  # the common case
            return [
                host.view[p.offset : p.offset + p.length]  # type: ignore[union-attr]
                for p, host in zip(chunk.pieces, made, strict=True)
            ], None
        tensors = [tensor_of(p.tensor) for p in chunk.pieces]
        ringed = [self.ringed(t) for t in tensors]
        slot = self._ring(slot_bytes).acquire(RING_WAIT) if any(ringed) else None
        views: list[memoryview] = []
        position = 0
        try:
            for piece, tensor, in_ring in zip(chunk.pieces, tensors, ringed, strict=True):
                size = piece.nbytes
                if in_ring:
                    assert slot is not None
                    source = piece.of(flat_bytes(tensor.detach()))
                    slot.buffer[position : position + size].view(source.shape).copy_(source)
                    views.append(slot.view[position : position + size])
                else:
                    host = self.bytes_of(piece.tensor, tensor_of)
                    views.append(
                        host.view[piece.offset : piece.offset + piece.length]
                        if piece.repeat == 1
                        else owned_view(piece.of(host.flat).contiguous().reshape(-1))
                    )
                position += size
        except BaseException:
            if slot is not None:
                self.release(slot)
            raise
        return views, slot

    def release(self, slot: Slot) -> None:
        assert self.ring is not None
        self.ring.release(slot)

    def _ring(self, slot_bytes: int) -> DeviceRing:
        with self._lock:
            if self.ring is None:
                self.ring = DeviceRing(self.slots, slot_bytes, torch.cuda.is_available())
            return self.ring


class LoadedTensors:
    """A model fully in memory. Digests are computed in a background thread unless
    `manifest` (built from these very tensors) is given; with `unavailable`, every client
    is told that reason instead of being offered a manifest. `chunk_bytes` and
    `column_tiles` plan the chunks (`manifest.plan_chunks`). `ringed`: which tensors a
    sender stages chunk by chunk through a ring of host buffers (default: contiguous device
    tensors, `on_device`; see HostBytes).
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        column_tiles: int = 1,
        manifest: Manifest | None = None,
        unavailable: str | None = None,
        ringed: Callable[[torch.Tensor], bool] | None = None,
    ) -> None:
        self._tensors = dict(tensors)
        self._identity = identity
        if not 1 <= column_tiles <= MAX_COLUMN_TILES:
            raise UsageError(f"column_tiles must be 1 to {MAX_COLUMN_TILES}, not {column_tiles}")
        self._chunk_bytes = chunk_bytes
        self._column_tiles = column_tiles
        self._manifest = manifest
        self._unavailable = unavailable
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._started = threading.Lock()
        self._host = HostBytes(ringed)
        self._digesting = False
        if manifest is not None:
            self._ready.set()

    @property
    def complete(self) -> bool:
        return True

    @property
    def tensors(self) -> Mapping[str, torch.Tensor]:
        """The tensors it serves, by name."""
        return self._tensors

    def prepare(self) -> None:
        """Start computing the digests in the background (once). A Server calls this once
        it is listening, so a failed start leaves no thread behind."""
        with self._started:
            if self._ready.is_set() or self._digesting:
                return
            self._digesting = True
        # Not joined anywhere: it is finite and holds no socket.
        threading.Thread(target=self._digest, name="netloader-digest", daemon=True).start()

    def manifest(self, timeout: float | None = None) -> Manifest:
        if self._unavailable is not None:
            raise SourceUnavailable(self._unavailable)
        self.prepare()
        # Digests are finite work; waiting for them is bounded by the caller only on request.
        if not self._ready.wait(timeout):
            raise SourceUnavailable("manifest digests are still being computed")
        if self._manifest is None:
            raise SourceUnavailable(f"cannot serve: {self._error}")
        return self._manifest

    def host(self, index: int) -> HostTensor:
        assert self._manifest is not None
        return self._host.bytes_of(index, self.tensor)

    def tensor(self, index: int) -> torch.Tensor:
        assert self._manifest is not None
        name = self._manifest.tensors[index].name
        held = self._tensors.get(name)
        if held is None:  # a part of a model (PartOfModel) lacks it
            raise SourceUnavailable(f"this server does not hold tensor {name!r}")
        return held

    def views(self, chunk: Chunk) -> tuple[list[memoryview], Slot | None]:
        assert self._manifest is not None
        return self._host.chunk_views(chunk, self.tensor, self._manifest.largest_chunk)

    def release(self, slot: Slot) -> None:
        self._host.release(slot)

    def wait_for(self, chunk: Chunk, timeout: float) -> None:
        return None  # everything is here

    def _digest(self) -> None:
        try:
            started = time.perf_counter()
            self._manifest = build_manifest(
                self._identity, self._tensors, self._chunk_bytes, self._column_tiles
            )
            log.debug(
                "netloader: digests of %d bytes in %.2f s",
                self._manifest.total_bytes,
                time.perf_counter() - started,
            )
        except BaseException as exc:  # reported to every client; never kills the host
            self._error = exc
            log.error("netloader: cannot build the manifest: %s", exc)
        finally:
            self._ready.set()


class PartOfModel(LoadedTensors):
    """Some (or all) of the tensors of a model whose whole `manifest` (digests included) is
    known: each chunk made of them only is served once it is checked against its digest
    (the tensors were verified before; this catches any write since); a chunk with bytes
    of any other tensor is refused, saying `lacking`, and the client takes it from its next
    source. So an instance that took only what a new version changed relays exactly that
    delta to the instances that hold the version it had, and keeps offering the version it
    had, checked, to those that ask for it."""

    def __init__(
        self, tensors: Mapping[str, torch.Tensor], manifest: Manifest, *, lacking: str
    ) -> None:
        super().__init__(
            tensors,
            manifest.identity,
            chunk_bytes=manifest.chunk_bytes,
            column_tiles=manifest.column_tiles,
            manifest=manifest,
        )
        self._held = {i for i, t in enumerate(manifest.tensors) if t.name in tensors}
        self._lacking = lacking
        self._checked: set[int] = set()  # chunk numbers (a set's add is atomic)

    @property
    def complete(self) -> bool:
        return len(self._held) == len(self.manifest().tensors)

    def wait_for(self, chunk: Chunk, timeout: float) -> None:
        if chunk.number in self._checked:
            return
        manifest = self.manifest()  # given: never waits
        lacking = [p.tensor for p in chunk.pieces if p.tensor not in self._held]
        if lacking:
            name = manifest.tensors[lacking[0]].name
            raise SourceUnavailable(f"{self._lacking}; it lacks chunk {chunk.number} ({name!r})")
        views = [
            owned_view(p.of(self.host(p.tensor).flat).contiguous().reshape(-1))
            for p in chunk.pieces
        ]
        if digest_of(views) != manifest.digests[chunk.number]:
            raise SourceUnavailable(
                f"{manifest.describe_chunk(chunk)} changed since it was verified: not served"
            )
        self._checked.add(chunk.number)


def keep_through_switch(offered: Holdings, written: Collection[int]) -> PartOfModel | None:
    """What it takes to go on serving `offered` (a complete version of a model, with its
    manifest) while a live update writes the storages at `written` (their
    `untyped_storage().data_ptr()`) in place: its tensors in those storages cloned now, the
    others served as they are, every chunk checked against its digest before it is first
    served (a write not foreseen is refused, not served). None if `offered` is not a
    complete model in memory that is serving."""
    if not isinstance(offered, LoadedTensors) or not offered.complete:
        return None
    try:
        manifest = offered.manifest(0)
    except SourceUnavailable:  # not serving (unavailable, or still digesting)
        return None
    kept = {
        name: tensor.clone() if tensor.untyped_storage().data_ptr() in written else tensor
        for name, tensor in offered.tensors.items()
    }
    return PartOfModel(kept, manifest, lacking="it holds every tensor")  # never said


class Arrivals:
    """The holdings of a client that is still receiving: the manifest it adopted, and the
    chunks verified so far. The client calls `begin`, `arrived` and, if it gives up,
    `fail`; server threads wait on it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._manifest: Manifest | None = None
        self._tensors: list[torch.Tensor] = []
        self._held: set[int] = set()  # chunk indices
        self._failure: str | None = None
        self._host = HostBytes()

    # ---- the receiving side ---------------------------------------------------------------
    def begin(self, manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> None:
        with self._changed:
            self._manifest = manifest
            self._tensors = [tensors[t.name] for t in manifest.tensors]
            self._changed.notify_all()

    def arrived(self, chunk: Chunk) -> None:
        with self._changed:
            self._held.add(chunk.number)
            self._changed.notify_all()

    def fail(self, reason: str) -> None:
        """No more chunks will arrive: waiting servers answer 'unavailable' at once."""
        with self._changed:
            self._failure = reason
            self._changed.notify_all()

    @property
    def adopted(self) -> Manifest | None:
        """The manifest the pull adopted, if it got that far."""
        with self._changed:
            return self._manifest

    # ---- Holdings -----------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return True  # every chunk, as it arrives

    def prepare(self) -> None:
        return None

    def manifest(self, timeout: float) -> Manifest:
        with self._changed:
            if not self._changed.wait_for(
                lambda: self._manifest is not None or self._failure is not None, timeout
            ):
                raise SourceUnavailable(f"relay has no manifest from upstream after {timeout} s")
            if self._manifest is None:
                raise SourceUnavailable(f"relay failed before its first chunk: {self._failure}")
            return self._manifest

    def host(self, index: int) -> HostTensor:
        return self._host.bytes_of(index, self.tensor)

    def tensor(self, index: int) -> torch.Tensor:
        return self._tensors[index]

    def views(self, chunk: Chunk) -> tuple[list[memoryview], Slot | None]:
        assert self._manifest is not None
        return self._host.chunk_views(chunk, self.tensor, self._manifest.largest_chunk)

    def release(self, slot: Slot) -> None:
        self._host.release(slot)

    def wait_for(self, chunk: Chunk, timeout: float) -> None:
        with self._changed:
            if not self._changed.wait_for(
                lambda: chunk.number in self._held or self._failure is not None, timeout
            ):
                raise SourceUnavailable(
                    f"relay: chunk {chunk.number} not received from upstream within {timeout} s"
                )
            if chunk.number not in self._held:
                raise SourceUnavailable(f"relay lacks chunk {chunk.number}: {self._failure}")
