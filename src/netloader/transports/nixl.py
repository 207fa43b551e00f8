"""Chunks read one-sidedly with NIXL (the transfer library behind vLLM's disaggregated
serving connectors): the server registers its tensors' memory with its NIXL agent once and
hands the client the agent's metadata; the client registers each destination and issues
READs, several at once, verifying each chunk when it lands. Over UCX that is RDMA between
hosts and NVLink/shared memory within one; on hosts without either, UCX's TCP.

Per FETCH, on the control connection:

    client: FETCH "nixl"
    server: NIXL_SETUP {agent name, agent metadata}; CHUNK_ADDRESS {tensor, chunk,
            address} per chunk (as it is held, at the server's send rate); END
    client: DONE once every chunk is read and verified

The metadata is NIXL's own serialisation, parsed by its C++ agent (bounded in size; the
Python helpers that unpickle descriptor lists are never used). TLS does not cover the
bytes, so a TLS server refuses this transport. An optional dependency:
`pip install 'netloader-weights[nixl]'`.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from netloader import protocol as p
from netloader.errors import (
    PeerClosed,
    ProtocolError,
    SourceUnavailable,
    TransferError,
    TransferTimeout,
)
from netloader.manifest import Chunk
from netloader.settings import Timeouts
from netloader.transports.addresses import expect_addresses, send_addresses
from netloader.transports.base import ChunkList, ChunkSink, ChunkSource, Transport
from netloader.transports.connection import Connection

log = logging.getLogger(__name__)

WINDOW = 4  # READs in flight per connection
POLL = 0.0005  # seconds between looks at a READ in flight
INSTALL = "TRANSPORT=nixl needs the nixl package: pip install 'netloader-weights[nixl]'"


def import_error() -> str | None:
    """Why NIXL cannot be used in this process; None if it can."""
    try:
        import nixl._api  # noqa: F401
    except Exception as exc:  # ImportError, or a backend that fails to load
        return f"{INSTALL} ({exc})"
    return None


class Agent:
    """One of this process's NIXL agents (UCX backend), its registrations kept for its
    life: a server's tensors are registered once, however many clients read them.

    serving: the agent others read from. Its progress thread answers their reads, polling
    without pause, so only a process that serves over NIXL has one; a pulling agent's
    transfers progress when their state is checked, and it costs nothing once idle."""

    def __init__(self, *, serving: bool) -> None:
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        self.name = f"netloader-{secrets.token_hex(16)}"
        # Several connections (striping, concurrent clients) use the agent at once.
        config = nixl_agent_config(
            enable_prog_thread=serving,
            backends=["UCX"],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW,
        )
        self.nixl = nixl_agent(self.name, config)
        self._registered: dict[tuple[int, int], Any] = {}
        self._remotes: dict[str, int] = {}  # remote agent -> connections using it
        self.lock = threading.Lock()

    def register(self, regions: list[tuple[int, int]]) -> None:
        """Register each region (address, length) unless it already is."""
        with self.lock:
            new = [
                (address, length, 0, "")
                for address, length in dict.fromkeys(regions)
                if length and (address, length) not in self._registered
            ]
            if new:
                handle = self.nixl.register_memory(self.nixl.get_reg_descs(new, "DRAM"))
                for ptr, size, _, _ in new:
                    self._registered[(ptr, size)] = handle

    def metadata(self) -> bytes:
        with self.lock:
            return bytes(self.nixl.get_agent_metadata())

    def add_remote(self, name: str, metadata: bytes) -> str:
        """Load a peer agent's metadata (again: it may have registered more since); the
        name NIXL found in it. A server in this very process is this agent."""
        with self.lock:
            if name == self.name:
                return name
            name = self.nixl.add_remote_agent(metadata)
            name = name.decode() if isinstance(name, bytes) else str(name)
            self._remotes[name] = self._remotes.get(name, 0) + 1
            return name

    def remove_remote(self, name: str) -> None:
        with self.lock:
            if name == self.name:
                return
            left = self._remotes.get(name, 1) - 1
            if left > 0:
                self._remotes[name] = left
                return
            self._remotes.pop(name, None)
            try:
                self.nixl.remove_remote_agent(name)
            except Exception as exc:
                log.debug("netloader: nixl: removing agent %s: %s", name, exc)


_AGENTS: dict[bool, Agent] = {}  # serving -> this process's agent for that side
_AGENT_LOCK = threading.Lock()


def agent(*, serving: bool) -> Agent:
    """This process's serving or pulling agent, made on first use; SourceUnavailable if
    NIXL is missing."""
    with _AGENT_LOCK:
        if serving not in _AGENTS:
            why = import_error()
            if why is not None:
                raise SourceUnavailable(why)
            _AGENTS[serving] = Agent(serving=serving)
        return _AGENTS[serving]


class NixlTransport(Transport):
    name = "nixl"
    tls = False
    memory = frozenset({"cpu"})  # device memory is staged in host memory for now

    def unavailable(self) -> str | None:
        return import_error()

    # ---- server -------------------------------------------------------------------------
    def send_chunks(
        self, conn: Connection, source: ChunkSource, chunks: ChunkList, timeouts: Timeouts
    ) -> None:
        local = agent(serving=True)
        regions = {r.data_ptr(): r for c in chunks for r in source.regions(c)}
        local.register([(r.data_ptr(), r.numel()) for r in regions.values()])
        conn.send(p.NixlSetup(local.name, local.metadata()))
        send_addresses(conn, source, chunks, timeouts)

    # ---- client -------------------------------------------------------------------------
    def receive_chunks(
        self, conn: Connection, chunks: ChunkList, sink: ChunkSink, timeouts: Timeouts
    ) -> None:
        setup = conn.expect(p.NixlSetup)
        local = agent(serving=False)
        try:
            remote = local.add_remote(setup.agent, setup.metadata)
        except Exception as exc:
            raise ProtocolError(f"{conn.peer} sent NIXL metadata NIXL refused: {exc}") from exc
        if remote != setup.agent:
            local.remove_remote(remote)
            raise ProtocolError(f"{conn.peer} named agent {setup.agent}, its metadata {remote}")
        reads: deque[_Read] = deque()
        try:
            for chunk in chunks:
                addresses = expect_addresses(conn, chunk, timeouts)
                reads.append(_Read(local, remote, chunk, sink, addresses, conn.peer))
                if len(reads) >= WINDOW:
                    reads.popleft().finish(timeouts)
            conn.expect(p.End)
            while reads:
                reads.popleft().finish(timeouts)
        finally:
            for read in reads:
                read.abandon()
            local.remove_remote(remote)
        conn.send(p.Done())


class _Read:
    """One chunk's READ, posted on creation."""

    def __init__(
        self,
        local: Agent,
        remote: str,
        chunk: Chunk,
        sink: ChunkSink,
        addresses: Sequence[int],
        peer: str,
    ) -> None:
        self.local, self.chunk, self.sink, self.peer = local, chunk, sink, peer
        self.handle: Any = None
        if not chunk.length:
            return
        landing = sink.landing(chunk)
        local.register(
            [(a, p.nbytes) for a, p in zip(landing.addresses, chunk.pieces, strict=True)]
        )
        runs = [  # a strided piece (a column tile): a descriptor per run
            run
            for piece, here, there in zip(chunk.pieces, landing.addresses, addresses, strict=True)
            for run in piece.runs(here, there)
            if run[2]
        ]
        nixl = local.nixl
        try:
            mine = nixl.get_xfer_descs([(here, n, 0) for here, _, n in runs], "DRAM")
            theirs = nixl.get_xfer_descs([(there, n, 0) for _, there, n in runs], "DRAM")
            self.handle = nixl.initialize_xfer("READ", mine, theirs, remote)
            if nixl.transfer(self.handle) == "ERR":
                raise TransferError("the transfer was refused")
        except Exception as exc:
            self.abandon()
            raise TransferError(
                f"{peer}: nixl cannot read chunk {chunk.number} "
                f"({chunk.length} bytes at {addresses[0]:#x}): {exc}",
                source=peer,
            ) from exc

    def finish(self, timeouts: Timeouts) -> None:
        """Wait for the READ (bounded like any chunk), then verify it."""
        if self.handle is not None:
            deadline = time.monotonic() + timeouts.for_chunk(self.chunk.length)
            nixl = self.local.nixl
            while (state := nixl.check_xfer_state(self.handle)) == "PROC":
                if time.monotonic() > deadline:
                    self.abandon()
                    raise TransferTimeout(
                        f"{self.peer}: nixl read of chunk {self.chunk.number} took longer than "
                        f"{timeouts.for_chunk(self.chunk.length):g} s",
                        source=self.peer,
                    )
                time.sleep(POLL)
            self.abandon()
            if state != "DONE":
                raise PeerClosed(
                    f"{self.peer}: nixl read of chunk {self.chunk.number} failed ({state}): "
                    "did the server go away?",
                    source=self.peer,
                )
        self.sink.received(self.chunk, source=self.peer)

    def abandon(self) -> None:
        if self.handle is not None:
            try:
                self.local.nixl.release_xfer_handle(self.handle)
            except Exception as exc:  # a READ still in flight cannot be released
                log.debug("netloader: nixl: releasing a read: %s", exc)
            self.handle = None


NIXL = NixlTransport()
