"""Client and server on one host, their tensors on CUDA devices: the client opens the
server's device memory with CUDA IPC and copies each chunk device to device, straight into
its parameters, then verifies it on the device with the manifest's device digest
(device_digest.py). No byte of the weights touches host memory on either side.

Per FETCH, on the control connection:

    client: FETCH "cuda-ipc"
    server: CUDA_IPC_OFFER {boot id, the client's address as the server sees it, the UUIDs
            of its GPUs, a token, a probe: a device buffer holding the token, exported}
            (or CUDA_IPC_OFFER {reason} where it cannot: the client declines)
    client: opens the probe and reads the token back, then SAME_HOST_ACCEPT; or
            SAME_HOST_DECLINE {why}, after which the chunks come as DATA frames (tcp)
    server: CUDA_IPC_TENSOR {tensor, its storage's IPC handle, where the tensor starts}
            before the first chunk of each tensor; CHUNK_ADDRESS {chunk, each piece's byte
            offset in its storage} per chunk (once held, at the server's send rate); END
    client: copies and verifies every chunk, then DONE

Being on one host is proved as for same-host (the same boot id, the same TCP four-tuple
seen from both ends), and the probe proves that this process can open that server's GPU
memory (IPC permitted, the device visible here). The handles give access to the server's
device memory, so they go only over an authenticated connection (a shared secret on both
sides); torch's own IPC bookkeeping (`UntypedStorage._share_cuda_`, and its reference
counts that keep an exported allocation alive while a client has it open) is used, with
every field sent as plain bytes and integers in typed, bounded messages, never pickled.

Every refusal (no CUDA, another host, no secret, IPC not permitted, a GPU this process
cannot see, destinations or server tensors not on CUDA) falls back to tcp with one log line
per connection under TRANSPORT=auto; TRANSPORT=cuda-ipc fails the source instead.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import re
import secrets
from collections import deque
from collections.abc import Callable, Mapping, Sequence

import torch

from netloader import device_digest as dd
from netloader import protocol as p
from netloader.errors import ProtocolError, SourceUnavailable
from netloader.manifest import Chunk, Piece
from netloader.settings import Timeouts
from netloader.transports import process_memory, same_host
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.connection import Connection

log = logging.getLogger(__name__)

WINDOW = 4  # chunks copied and digested on the device before the oldest one's check
TOKEN_BYTES = 32
# NETLOADER_DEVICE_DIGEST: which form of the device digest checks the chunks (the same
# sums either way): "auto" (default) the eager torch operations until the torch.compile'd
# kernel (one fused pass) is compiled in the background, then that; "eager"; "compiled"
# (compiled at the first chunk, the transfer waiting for it).
DIGEST_ENV = "NETLOADER_DEVICE_DIGEST"


class Refused(Exception):
    """Why a side cannot use CUDA IPC for this FETCH."""


def device_uuid(index: int) -> str:
    """A stable name of local CUDA device `index` (its UUID), the same in every process
    whatever CUDA_VISIBLE_DEVICES numbers it as."""
    uuid = str(torch.cuda.get_device_properties(index).uuid)
    return re.sub(r"[^0-9A-Za-z-]", "", uuid)[:64] or f"index-{index}"


def local_devices() -> dict[str, int]:
    """UUID -> index of the CUDA devices this process sees."""
    return {device_uuid(i): i for i in range(torch.cuda.device_count())}


def digest_sums(device: torch.device) -> dd.Sums:
    """The device digest's per-block function for the next chunk on `device` (see
    DIGEST_ENV)."""
    form = os.environ.get(DIGEST_ENV, "auto")
    if form == "compiled":
        return dd.fused()
    return dd.lane_sums if form == "eager" else dd.ready(device)


# ---- server -----------------------------------------------------------------------------


def export(tensor: torch.Tensor, devices: list[str]) -> tuple[p.CudaIpcStorage, int]:
    """`tensor`'s storage exported for IPC (torch's `_share_cuda_`), with its device's
    UUID added to `devices`, and the byte offset where `tensor` starts in it."""
    storage = tensor.untyped_storage()
    device, handle, size, offset, ref, ref_offset, event, sync = storage._share_cuda_()  # type: ignore[no-untyped-call]
    uuid = device_uuid(int(device))
    if uuid not in devices:
        devices.append(uuid)
    exported = p.CudaIpcStorage(
        devices.index(uuid),
        bytes(handle),
        int(size),
        int(offset),
        bytes(ref),
        int(ref_offset),
        bytes(event or b""),
        bool(sync),
    )
    return exported, int(tensor.storage_offset()) * tensor.element_size()


def server_refusal(keyed: bool, tensors: Mapping[int, torch.Tensor]) -> str | None:
    """Why a server cannot offer CUDA IPC for these tensors (manifest index -> tensor);
    None if it can."""
    if not keyed:
        return (
            "CUDA IPC needs an authenticated connection (a shared secret on both sides): "
            "its handles open the server's device memory"
        )
    if process_memory.boot_id() is None:
        return f"the server cannot name its host ({process_memory.BOOT_ID} is not readable)"
    if not torch.cuda.is_available():
        return "the server's process has no CUDA device"
    for index, tensor in tensors.items():
        if not (tensor.is_cuda and tensor.is_contiguous()):
            return f"the server's tensor #{index} is not a contiguous CUDA tensor"
    return None


class _Exported:
    """What a server exported for one FETCH: the offer, and each tensor's storage and
    start (kept, with the probe, until the client is done)."""

    def __init__(self, conn: Connection, source: ChunkSource, chunks: ChunkList) -> None:
        tensors: dict[int, torch.Tensor] = {}
        for chunk in chunks:
            for piece, tensor in zip(chunk.pieces, source.tensors(chunk), strict=True):
                tensors[piece.tensor] = tensor
        why = server_refusal(conn.session.keyed, tensors)
        if why is not None:
            raise Refused(why)
        devices: list[str] = []
        token = secrets.token_bytes(TOKEN_BYTES)
        home = next((t.device for t in tensors.values()), torch.device("cuda"))
        try:
            self.storages = {
                index: export(tensor, devices)
                for index, tensor in tensors.items()
                if tensor.numel()
            }
            self.probe = torch.frombuffer(bytearray(token), dtype=torch.uint8).to(home)
            probe, _ = export(self.probe, devices)
        except RuntimeError as exc:  # the driver refuses to export
            raise Refused(f"the server cannot export device memory for CUDA IPC: {exc}") from exc
        for storage, _ in [*self.storages.values(), (probe, 0)]:
            if (why := storage.unsendable()) is not None:
                raise Refused(why)  # e.g. expandable segments' larger handles
        boot = process_memory.boot_id() or ""
        peer = same_host.address_text(conn.sock.getpeername())
        self.offer = p.CudaIpcOffer(boot, peer, tuple(devices), token, probe)

    def offsets(self, chunk: Chunk) -> tuple[int, ...]:
        """Each piece's byte offset in its tensor's storage."""
        return tuple(
            self.storages[piece.tensor][1] + piece.offset if piece.tensor in self.storages else 0
            for piece in chunk.pieces
        )


# ---- client -----------------------------------------------------------------------------


def client_refusal(keyed: bool, chunks: ChunkList, sink: ChunkSink) -> str | None:
    """Why this client cannot take these chunks by CUDA IPC; None if it can (as far as it
    can tell before the offer's probe)."""
    if not keyed:
        return "CUDA IPC needs an authenticated connection (a shared secret on both sides)"
    if not torch.cuda.is_available():
        return "this process has no CUDA device"
    if any(sink.device_targets(chunk) is None for chunk in chunks):
        return (
            "the destination tensors are not all contiguous CUDA tensors, or the server's "
            "manifest has no device digests"
        )
    return None


def open_storage(storage: p.CudaIpcStorage, device: int) -> torch.Tensor:
    """The bytes of an exported storage (flat uint8), opened on local device `device`, with
    torch's bookkeeping (one opening per allocation and process; released with the last
    tensor that uses it)."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    opened: torch.Tensor = rebuild_cuda_tensor(  # type: ignore[no-untyped-call]
        torch.Tensor,
        (storage.size,),
        (1,),
        0,
        torch.storage.TypedStorage,
        torch.uint8,
        device,
        storage.handle,
        storage.size,
        storage.offset,
        False,
        storage.ref_counter,
        storage.ref_offset,
        storage.event,
        storage.event_sync,
    )
    return opened


def _accept(
    conn: Connection, offer: p.CudaIpcOffer, chunks: ChunkList, sink: ChunkSink
) -> dict[int, int]:
    """Check the offer (see the module's docstring) and open its probe: the offer's device
    numbers -> this process's. SourceUnavailable says why not."""

    def refuse(reason: str) -> SourceUnavailable:
        return SourceUnavailable(f"{conn.peer}: {reason}", source=conn.peer)

    why = (
        offer.reason
        or client_refusal(conn.session.keyed, chunks, sink)
        or same_host.host_refusal(conn, offer.boot_id, offer.peer)
    )
    if why:
        raise refuse(why)
    local = local_devices()
    unseen = [uuid for uuid in offer.devices if uuid not in local]
    if unseen:
        raise refuse(f"the server's GPU {unseen[0]} is not visible to this process")
    devices = {i: local[uuid] for i, uuid in enumerate(offer.devices)}
    assert offer.probe is not None
    try:
        probe = open_storage(offer.probe, devices[offer.probe.device])
        seen = bytes(probe[:TOKEN_BYTES].cpu().numpy().tobytes())
    except RuntimeError as exc:
        raise refuse(f"CUDA IPC is not permitted here: {exc}") from exc
    if not hmac.compare_digest(seen, offer.token):
        raise refuse("the offered probe does not hold the offer's token")
    return devices


class _Copies:
    """The client's side after accepting: open each tensor as the server exports it, copy
    each chunk device to device into the sink's targets, digest it there, and check the
    digests a few chunks behind (so the device stays busy)."""

    def __init__(
        self,
        conn: Connection,
        sink: ChunkSink,
        devices: Mapping[int, int],
        sums: Callable[[torch.device], dd.Sums],
    ) -> None:
        self.conn, self.sink, self.devices, self.sums = conn, sink, devices, sums
        self.opened: dict[int, tuple[torch.Tensor, int]] = {}  # tensor -> storage, start
        self.pending: deque[tuple[Chunk, torch.Tensor]] = deque()

    def tensor_exported(self, message: p.CudaIpcTensor, wanted: set[int]) -> None:
        if message.tensor in self.opened or message.tensor not in wanted:
            raise ProtocolError(f"{self.conn.peer} exported tensor #{message.tensor} unasked")
        device = self.devices.get(message.storage.device)
        if device is None:
            raise ProtocolError(f"{self.conn.peer} exported a tensor on a GPU it did not offer")
        if message.start > message.storage.size:
            raise ProtocolError(
                f"{self.conn.peer} placed tensor #{message.tensor} past its storage"
            )
        try:
            opened = open_storage(message.storage, device)
        except RuntimeError as exc:
            raise SourceUnavailable(
                f"{self.conn.peer}: cannot open tensor #{message.tensor} by CUDA IPC: {exc}",
                source=self.conn.peer,
            ) from exc
        self.opened[message.tensor] = (opened, message.start)

    def copy(self, chunk: Chunk, offsets: Sequence[int]) -> None:
        """Copy `chunk` (its pieces at `offsets` in their storages), start its digest."""
        targets = self.sink.device_targets(chunk)
        if targets is None or len(offsets) != len(chunk.pieces):
            raise ProtocolError(f"{self.conn.peer} named chunk {chunk.number} wrongly")
        for piece, offset, target in zip(chunk.pieces, offsets, targets, strict=True):
            if piece.nbytes:
                target.copy_(self._source(piece, offset), non_blocking=True)
        landed = dd.packed(targets)
        self.pending.append((chunk, dd.digest_sums(landed, self.sums(landed.device))))
        if len(self.pending) >= WINDOW:
            self.check_oldest()

    def _source(self, piece: Piece, offset: int) -> torch.Tensor:
        """Where `piece` lies in the server's memory, checked against its storage."""
        if piece.tensor not in self.opened:
            raise ProtocolError(f"{self.conn.peer} named a chunk of a tensor it did not export")
        storage, start = self.opened[piece.tensor]
        end = offset + (piece.repeat - 1) * piece.stride + piece.length
        if offset != start + piece.offset or end > storage.numel():
            raise ProtocolError(
                f"{self.conn.peer} named bytes [{offset}, {end}) of tensor #{piece.tensor}, "
                f"outside what it exported"
            )
        return piece.of(storage[start:])

    def check_oldest(self) -> None:
        chunk, sums = self.pending.popleft()
        arrived = dd.finish(sums.tolist(), chunk.length)
        self.sink.device_received(chunk, arrived, self.conn.peer)


def _receive_copies(
    conn: Connection,
    chunks: ChunkList,
    sink: ChunkSink,
    devices: Mapping[int, int],
    timeouts: Timeouts,
) -> None:
    copies = _Copies(conn, sink, devices, digest_sums)
    wanted = {piece.tensor for chunk in chunks for piece in chunk.pieces}
    try:
        for chunk in chunks:
            with conn.within(timeouts.for_chunk(chunk.length), f"chunk {chunk.number}"):
                message = conn.receive()
                while isinstance(message, p.CudaIpcTensor):
                    copies.tensor_exported(message, wanted)
                    message = conn.receive()
            if not isinstance(message, p.ChunkAddress) or message.chunk != chunk.number:
                raise ProtocolError(
                    f"{conn.peer} sent {message.TYPE.name} where chunk {chunk.number} belongs"
                )
            copies.copy(chunk, message.addresses)
        conn.expect(p.End)
        while copies.pending:
            copies.check_oldest()
    finally:
        if copies.pending and torch.cuda.is_available():
            # Copies still read the server's memory: let them end before it is closed.
            with contextlib.suppress(RuntimeError):
                torch.cuda.synchronize()


class CudaIpcTransport(same_host.Declinable):
    """Copies chunks device to device from the server's GPU memory (see the module).

    fallback: where CUDA IPC cannot be used, take the chunks as DATA frames on the same
              connection (logged once per connection); without it the source fails with
              the reason (TRANSPORT=cuda-ipc forces the path).
    """

    name = "cuda-ipc"
    tls = True  # the bytes never touch a network; the handles and digests come over the
    # (TLS-covered) control connection
    memory = frozenset({"cuda"})

    def unavailable(self) -> str | None:
        if not self.fallback and not torch.cuda.is_available():
            return "TRANSPORT=cuda-ipc needs a CUDA device in this process"
        return None

    # ---- server -------------------------------------------------------------------------
    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        exported: _Exported | None = None
        try:
            exported = _Exported(conn, source, chunks)
        except Refused as exc:
            conn.send(p.CudaIpcOffer.refused(str(exc)))
        else:
            conn.send(exported.offer)
        if same_host.sent_over_tcp_if_declined(conn, source, chunks, timeouts):
            return
        if exported is None:
            raise ProtocolError(f"{conn.peer} accepted a CUDA IPC offer that was refused")
        sent: set[int] = set()
        for chunk in chunks:
            source.ready(chunk)
            for piece in chunk.pieces:
                if piece.tensor in exported.storages and piece.tensor not in sent:
                    storage, start = exported.storages[piece.tensor]
                    conn.send(p.CudaIpcTensor(piece.tensor, storage, start))
                    sent.add(piece.tensor)
            conn.send(p.ChunkAddress(chunk.number, exported.offsets(chunk)))
        conn.send(p.End())
        with conn.within(timeouts.for_chunk(sum(c.length for c in chunks)), "the client's copies"):
            conn.expect(p.Done)

    # ---- client -------------------------------------------------------------------------
    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        offer = conn.expect(p.CudaIpcOffer)
        try:
            devices = _accept(conn, offer, chunks, sink)
        except SourceUnavailable as exc:
            if not self.fallback:
                raise
            same_host.decline(conn, self.name, "CUDA IPC", str(exc), chunks, sink, timeouts)
            return
        conn.send(p.SameHostAccept())
        _receive_copies(conn, chunks, sink, devices, timeouts)
        conn.send(p.Done())


class AutoTransport(Transport):
    """TRANSPORT=auto: CUDA IPC where `wants_device` (every destination a CUDA tensor, the
    server's manifest with device digests, an authenticated connection); else same-host
    where client and server share a host; else tcp. Each falls back to tcp with one log
    line per connection. Only `for_connection` picks: what it returns is asked for."""

    name = same_host.AUTO.name  # what a pull that fetched nothing reports, as before
    tls = True
    memory = frozenset({"cpu", "cuda"})

    def __init__(self, wants_device: Callable[[Connection, ChunkSink], bool]) -> None:
        self.wants_device = wants_device

    def for_connection(self, conn: Connection, sink: ChunkSink | None = None) -> Transport:
        if sink is not None and self.wants_device(conn, sink):
            return CUDA_IPC_AUTO.for_connection(conn)
        return same_host.AUTO.for_connection(conn)

    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        same_host.AUTO.send_chunks(conn, source, chunks, timeouts)

    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        same_host.AUTO.receive_chunks(conn, chunks, sink, timeouts)


def wants_device(conn: Connection, sink: ChunkSink) -> bool:
    """Whether TRANSPORT=auto asks for CUDA IPC on `conn`: its session is authenticated,
    CUDA is here, and the sink's chunks all go to CUDA tensors with device digests."""
    return conn.session.keyed and torch.cuda.is_available() and sink.all_on_device()


CUDA_IPC = CudaIpcTransport(fallback=False)  # TRANSPORT=cuda-ipc: this path or nothing
CUDA_IPC_AUTO = CudaIpcTransport(fallback=True)  # within TRANSPORT=auto
AUTO = AutoTransport(wants_device)
