"""The pulling side: handshake, manifest check, then bytes straight into the caller's
tensors, chunk by chunk, each verified against the server's digest."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from netloader import protocol as p
from netloader.connection import Connection, connect
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import (
    AuthenticationError,
    IntegrityError,
    ManifestMismatch,
    NetloaderError,
    ProtocolError,
    SourceUnavailable,
    TransferError,
    VersionMismatch,
)
from netloader.manifest import (
    PROTOCOL_VERSION,
    Chunk,
    Identity,
    Manifest,
    digest,
    expected_manifest,
)
from netloader.tensors import advise_huge_pages, byte_view, flat_bytes, prefault
from netloader.transports import process_group, tcp

log = logging.getLogger(__name__)

DEFAULT_TRANSPORT = "tcp"  # chosen by measurement: see README, "Benchmark"


@dataclass(frozen=True)
class LoadReport:
    sources: tuple[str, ...]
    transport: str
    tensors: int
    bytes: int
    seconds: float
    verified: bool = True
    failures: tuple[str, ...] = field(default=())  # sources that failed before another finished

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def summary(self) -> str:
        return (
            f"{self.tensors} tensors, {self.bytes} bytes in {self.seconds:.3f} s "
            f"({self.gbps:.2f} GB/s) from {', '.join(self.sources)} over {self.transport}, "
            f"{'verified' if self.verified else 'NOT verified'}"
        )


class _VerifyingSink:
    """Where chunks land (the caller's tensor memory, or a staging buffer when that memory
    is not contiguous host memory) and the digest check that accepts them."""

    def __init__(
        self,
        manifest: Manifest,
        dest: Mapping[str, torch.Tensor],
        progress: Callable[[int], None] | None,
        huge_pages: bool = False,
    ) -> None:
        self.manifest = manifest
        self.dest = [dest[t.name] for t in manifest.tensors]
        # Write straight into contiguous host tensors; stage the rest and copy when complete.
        self.staged = [t.device.type != "cpu" or not t.is_contiguous() for t in self.dest]
        self.views = [
            torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
            if staged
            else flat_bytes(t)
            for t, staged in zip(self.dest, self.staged, strict=True)
        ]
        if huge_pages:
            for view in self.views:
                advise_huge_pages(view)
        self.missing = {t: manifest.chunk_count(t) for t in range(len(manifest.tensors))}
        self.done_chunks: set[tuple[int, int]] = set()
        self.bytes = 0
        self.progress = progress

    def destination(self, chunk: Chunk) -> torch.Tensor:
        view = self._view(chunk)
        prefault(view)
        return view

    def _view(self, chunk: Chunk) -> torch.Tensor:
        return self.views[chunk.tensor][chunk.offset : chunk.offset + chunk.length]

    def received(self, chunk: Chunk, arrived: str | None = None) -> None:
        entry = self.manifest.tensors[chunk.tensor]
        if arrived is None:
            arrived = digest(byte_view(self._view(chunk)))
        if arrived != entry.digests[chunk.number]:
            raise IntegrityError(
                f"tensor {entry.name!r} chunk {chunk.number}: digest mismatch, bytes rejected"
            )
        self.done_chunks.add((chunk.tensor, chunk.number))
        self.bytes += chunk.length
        self.missing[chunk.tensor] -= 1
        if self.missing[chunk.tensor] == 0 and self.staged[chunk.tensor]:
            target = self.dest[chunk.tensor]
            target.copy_(self.views[chunk.tensor].view(target.dtype).reshape(target.shape))
        if self.progress is not None:
            self.progress(chunk.length)

    def remaining(self) -> list[Chunk]:
        return [c for c in self.manifest.chunks() if (c.tensor, c.number) not in self.done_chunks]

    def completed(self) -> list[str]:
        return [t.name for i, t in enumerate(self.manifest.tensors) if self.missing[i] == 0]


class Client:
    """Pulls from `sources`, in order, falling over to the next on any failure and
    resuming where the previous one stopped."""

    def __init__(
        self,
        sources: Sequence[Endpoint | str],
        *,
        secret: bytes | None = None,
        transport: str = "auto",
        connect_timeout: float = 5.0,
        stall_timeout: float = 10.0,
        huge_pages: bool = False,
    ) -> None:
        """`huge_pages`: ask Linux for 2 MiB pages on never-touched destination memory.
        Measured here it roughly halves the median fresh-memory pull but with spikes to
        twice the plain time (synchronous compaction), and was slower inside vLLM, so it
        is off by default."""
        self.sources = [s if isinstance(s, Endpoint) else parse_endpoint(s) for s in sources]
        self.secret = secret
        self.huge_pages = huge_pages
        self.transport = DEFAULT_TRANSPORT if transport == "auto" else transport
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout

    # ---- public -------------------------------------------------------------------------
    def manifest(self) -> Manifest:
        """The first reachable source's manifest."""
        errors: list[str] = []
        for source in self.sources:
            try:
                conn = self._open(source)
            except TransferError as exc:
                errors.append(str(exc))
                continue
            try:
                return self._fetch_manifest(conn)
            finally:
                _bye(conn)
        raise SourceUnavailable("no source answered: " + "; ".join(errors or ["no sources given"]))

    def load_into(
        self,
        dest: Mapping[str, torch.Tensor],
        identity: Identity,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> LoadReport:
        """Fill `dest` (name -> tensor of the right dtype and shape) from the sources.

        Raises a TransferError subclass if not every tensor arrived verified; its
        `completed` names the tensors that did (the others hold undefined bytes).
        """
        expected = expected_manifest(identity, dest)
        reference: Manifest | None = None
        sink: _VerifyingSink | None = None
        used: list[str] = []
        failures: list[str] = []
        last_error: TransferError | None = None
        started = time.perf_counter()
        for source in self.sources:
            conn: Connection | None = None
            try:
                conn = self._open(source)
                offered = self._fetch_manifest(conn)
                differences = expected.differences(offered)
                if reference is not None and differences == []:
                    differences = _digest_differences(reference, offered)
                if differences:
                    raise ManifestMismatch.from_differences(differences, source=str(source))
                if reference is None:
                    reference, sink = (
                        offered,
                        _VerifyingSink(offered, dest, progress, self.huge_pages),
                    )
                assert sink is not None
                self._receive(conn, sink.remaining(), sink)
                used.append(str(source))
                _bye(conn)
                break
            except (TransferError, ProtocolError) as caught:
                exc = (
                    caught
                    if isinstance(caught, TransferError)
                    else TransferError(f"{source} broke the protocol: {caught}", source=str(source))
                )
                last_error = exc
                failures.append(str(exc) if str(source) in str(exc) else f"{source}: {exc}")
                log.warning("netloader: source %s failed: %s", source, exc)
                if conn is not None:
                    # Polite goodbye where the stream is still in step (nothing was fetched).
                    _bye(conn) if isinstance(exc, ManifestMismatch) else conn.close()
        else:
            completed = sink.completed() if sink is not None else []
            message = "; ".join(failures) if failures else "no sources configured"
            error_type = type(last_error) if last_error is not None else SourceUnavailable
            raise error_type(
                f"pull incomplete ({len(completed)} of {len(dest)} tensors verified): {message}",
                source=last_error.source if last_error else None,
                completed=completed,
            )
        assert sink is not None
        report = LoadReport(
            sources=tuple(used),
            transport=self.transport,
            tensors=len(dest),
            bytes=sink.bytes,
            seconds=time.perf_counter() - started,
            failures=tuple(failures),
        )
        log.info("netloader: loaded %s", report.summary())
        return report

    # ---- one connection -----------------------------------------------------------------
    def _open(self, source: Endpoint) -> Connection:
        try:
            sock = connect(source.host, source.port, self.connect_timeout)
        except OSError as exc:
            raise SourceUnavailable(
                f"cannot connect to {source}: {exc}", source=str(source)
            ) from exc
        conn = Connection(sock, str(source))
        try:
            self._handshake(conn)
        except BaseException:
            conn.close()
            raise
        conn.settimeout(self.stall_timeout)
        return conn

    def _handshake(self, conn: Connection) -> None:
        conn.settimeout(self.connect_timeout)
        nonce = p.new_nonce()
        conn.send(p.Hello(PROTOCOL_VERSION, nonce).encode())
        _, body = conn.recv_message(p.MsgType.WELCOME)
        welcome = p.Welcome.decode(body)
        if welcome.protocol != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"{conn.peer} speaks protocol {welcome.protocol}, we speak {PROTOCOL_VERSION}",
                source=conn.peer,
            )
        if welcome.auth and self.secret is None:
            raise AuthenticationError(
                f"authentication: {conn.peer} requires a secret and none is configured",
                source=conn.peer,
            )
        if self.secret is not None:
            if not welcome.auth or not p.proof_matches(
                self.secret, "server", nonce, welcome.nonce, welcome.proof
            ):
                raise AuthenticationError(
                    f"authentication: {conn.peer} could not prove it knows the shared secret",
                    source=conn.peer,
                )
            conn.send(
                p.encode(
                    p.MsgType.AUTH, {"proof": p.proof(self.secret, "client", welcome.nonce, nonce)}
                )
            )

    def _fetch_manifest(self, conn: Connection) -> Manifest:
        conn.send(p.encode(p.MsgType.GET_MANIFEST, {}))
        _, body = conn.recv_message(p.MsgType.MANIFEST)
        manifest = Manifest.from_json(body)
        if any(not t.digests for t in manifest.tensors):
            raise ProtocolError(f"{conn.peer} sent a manifest without digests")
        return manifest

    def _receive(self, conn: Connection, chunks: list[Chunk], sink: _VerifyingSink) -> None:
        conn.send(p.Fetch(self.transport, tuple((c.tensor, c.number) for c in chunks)).encode())
        if self.transport == tcp.NAME:
            tcp.receive_chunks(conn, chunks, sink)
        else:
            process_group.receive_chunks(
                conn, chunks, sink, backend=self.transport, timeout=self.stall_timeout
            )


def _digest_differences(reference: Manifest, offered: Manifest) -> list[str]:
    """A later source must hold the very same bytes as the first, or the model would mix."""
    if reference.chunk_bytes != offered.chunk_bytes:
        return [f"chunk size {offered.chunk_bytes} differs from the first source's"]
    theirs = {t.name: t.digests for t in offered.tensors}
    return [
        f"tensor {t.name!r} content differs from the first source's"
        for t in reference.tensors
        if theirs.get(t.name) != t.digests
    ]


def _bye(conn: Connection) -> None:
    with contextlib.suppress(NetloaderError):
        conn.send(p.encode(p.MsgType.BYE, {}))
    conn.close()
