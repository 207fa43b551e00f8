"""Live updates: a model holding one version of its weights takes another from peers, in
place, all or nothing.

`stage_update` compares the chunk digests of the version the sources serve with those of
what the live tensors hold, pulls only the chunks that differ into staging memory and
verifies them; the live tensors do not change. `StagedUpdate.commit` then copies the
staged chunks into the live tensors, while the caller keeps whatever reads them (inference)
paused. An update that is not committed is discarded with its staging memory.

Across the ranks of one instance these are the two phases of one switch: every rank
stages, and each commits only once all of them have staged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

import torch

from netloader import metrics
from netloader.client.puller import Client
from netloader.errors import ManifestMismatch, NetloaderError, UsageError
from netloader.manifest import Identity, Manifest, build_manifest, expected_manifest
from netloader.server import LoadedTensors, Server
from netloader.server.holdings import keep_through_switch
from netloader.tensors import flat_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UpdateReport:
    """What an update moved: `changed` of the model's `chunk_total` chunks differed,
    `bytes` of its `total_bytes` were pulled, in the chunks of `tensors`."""

    model: str
    version: str
    changed: int
    chunk_total: int
    bytes: int
    total_bytes: int
    tensors: tuple[str, ...]
    sources: tuple[str, ...]
    stage_seconds: float
    switch_seconds: float = 0.0

    def summary(self) -> str:
        pulled = f"{self.bytes} of {self.total_bytes} bytes"
        return (
            f"{self.model} version {self.version or '(unversioned)'}: {self.changed} of "
            f"{self.chunk_total} chunks changed ({len(self.tensors)} tensors), {pulled} "
            f"pulled from {', '.join(self.sources) or 'nowhere'}, staged and verified in "
            f"{self.stage_seconds:.2f} s, switched in {self.switch_seconds:.3f} s"
        )


class StagedUpdate:
    """A new version, staged and verified beside the live tensors; `commit` switches."""

    def __init__(
        self,
        live: Mapping[str, torch.Tensor],
        manifest: Manifest,
        staging: dict[str, torch.Tensor],
        changed: list[int],
        report: UpdateReport,
    ) -> None:
        self.manifest = manifest  # the new version's: what the live tensors hold once committed
        self.report = report
        self._live = live
        self._staging = staging
        self._changed = changed
        self._done = False

    @property
    def staged_bytes(self) -> int:
        return sum(t.nbytes for t in self._staging.values())

    def commit(self, server: Server | None = None, *, keep_previous: bool = True) -> UpdateReport:
        """Copy the staged chunks into the live tensors (pause their readers around this)
        and, with `server` (serving the live tensors), serve the new version from then on,
        and, with `keep_previous`, the version it served until now to clients that ask for
        it (the tensors that change are copied first: up to the staged bytes again).
        Returns the report, with the switch's duration."""
        if self._done:
            raise UsageError("this update was committed or discarded already")
        self._done = True
        started = time.perf_counter()
        flats = {name: flat_bytes(self._live[name]) for name in self._staging}
        kept = None
        if server is not None and keep_previous:
            written = {flat.untyped_storage().data_ptr() for flat in flats.values()}
            kept = keep_through_switch(server.previous or server.holdings, written)
        staged = {name: flat_bytes(t) for name, t in self._staging.items()}
        try:
            with torch.no_grad():
                for index in self._changed:
                    for piece in self.manifest.chunks[index].pieces:
                        name = self.manifest.tensors[piece.tensor].name
                        piece.of(flats[name]).copy_(piece.of(staged[name]))
            for tensor in self._live.values():
                if tensor.device.type == "cuda":
                    torch.cuda.synchronize(tensor.device)
                    break
        except Exception as exc:  # e.g. out of device memory for a strided copy
            metrics.UPDATES_FINISHED.labels("error").inc()
            raise NetloaderError(
                f"the switch to version {self.report.version} failed partway ({exc}): the "
                "model now holds parts of both versions"
            ) from exc
        self._staging = {}
        if server is not None:
            ordered = {t.name: self._live[t.name] for t in self.manifest.tensors}
            server.serve_instead(
                LoadedTensors(
                    ordered,
                    self.manifest.identity,
                    chunk_bytes=self.manifest.chunk_bytes,
                    column_tiles=self.manifest.column_tiles,
                    manifest=self.manifest,
                ),
                previous=kept,
            )
        seconds = time.perf_counter() - started
        self.report = replace(self.report, switch_seconds=seconds)
        metrics.UPDATE_PHASE_SECONDS.labels("switch").observe(seconds)
        metrics.UPDATES_FINISHED.labels("ok").inc()
        metrics.holds_version(self.manifest.identity.model, self.manifest.identity.version)
        log.info("netloader: updated %s", self.report.summary())
        return self.report

    def discard(self) -> None:
        """Drop the staged version (the live tensors stay as they are)."""
        if not self._done:
            metrics.UPDATES_FINISHED.labels("discarded").inc()
        self._done = True
        self._staging = {}


def stage_update(
    client: Client,
    live: Mapping[str, torch.Tensor],
    identity: Identity,
    *,
    held: Manifest | None = None,
    max_staging_bytes: int | None = None,
) -> StagedUpdate:
    """Pull the version of the model that `client`'s sources serve, as far as it differs
    from what `live` holds, into staging memory, verified. The live tensors are untouched.

    client:   where the new version comes from (every source used serves the very manifest
              of the first that answers).
    live:     the model's tensors now, name -> contiguous tensor (host or device), the same
              names, dtypes and shapes the sources serve.
    identity: the model and its layout. With a `version`, only that version is taken (a
              source serving another is refused); without, whatever the sources serve.
    held:     the manifest of what `live` holds now, when at hand (a server's) and planned
              like the sources' (same chunk size and tiles); otherwise the digests are
              computed from `live`, reading it once.
    max_staging_bytes: a cap on the host memory the staged tensors take (each tensor with
              a changed chunk, whole); None: no cap.

    Raises ManifestMismatch (another model, layout or tensors), UsageError (tensors that
    are not contiguous, or more staging than allowed), or the pull's TransferError.
    """
    started = time.perf_counter()
    try:
        offered = client.manifest(version=identity.version)
        differences = expected_manifest(identity, live).differences(offered)
        if differences:
            raise ManifestMismatch.from_differences(differences, source=str(client.sources[0]))
        scattered = [name for name, t in live.items() if not t.is_contiguous()]
        if scattered:
            raise UsageError(f"an update lands in contiguous tensors: not {scattered[0]!r}")
        if held is None or not planned_alike(held, offered):
            in_order = {t.name: live[t.name] for t in offered.tensors}
            held = build_manifest(  # compared by xxh3 alone
                offered.identity,
                in_order,
                offered.chunk_bytes,
                offered.column_tiles,
                device_digests=False,
            )
        changed = changed_chunks(held, offered)
        names = offered.tensor_names(changed)
        check_staging(offered, names, max_staging_bytes)
        staging = {name: torch.empty(live[name].shape, dtype=live[name].dtype) for name in names}
        pulled = 0
        sources: tuple[str, ...] = ()
        if changed:
            loaded = client.load_into(staging, offered.identity, within=offered, chunks=changed)
            pulled, sources = loaded.bytes, tuple(str(s) for s in loaded.sources)
    except NetloaderError as exc:
        metrics.UPDATES_FINISHED.labels(metrics.kind(exc)).inc()
        raise
    seconds = time.perf_counter() - started
    metrics.UPDATE_PHASE_SECONDS.labels("stage").observe(seconds)
    report = UpdateReport(
        model=offered.identity.model,
        version=offered.identity.version,
        changed=len(changed),
        chunk_total=offered.chunk_total,
        bytes=pulled,
        total_bytes=offered.total_bytes,
        tensors=tuple(names),
        sources=sources,
        stage_seconds=seconds,
    )
    return StagedUpdate(live, offered, staging, changed, report)


def check_staging(offered: Manifest, names: Collection[str], limit: int | None) -> None:
    """Refuse (UsageError) to stage the tensors `names` of `offered` whole if they take more
    than `limit` bytes (None: no limit)."""
    names = set(names)
    needed = sum(t.nbytes for t in offered.tensors if t.name in names)
    if limit is not None and needed > limit:
        raise UsageError(
            f"the update changes {len(names)} tensors of {needed} bytes, more than the "
            f"staging limit of {limit} bytes"
        )


def changed_chunks(held: Manifest, offered: Manifest) -> list[int]:
    """The numbers of the chunks whose digests differ (the two planned alike)."""
    pairs = zip(held.digests, offered.digests, strict=True)
    return [i for i, (mine, theirs) in enumerate(pairs) if mine != theirs]


def planned_alike(held: Manifest, offered: Manifest) -> bool:
    """Whether `held`'s digests compare chunk by chunk with `offered`'s."""
    return (
        bool(held.digests)
        and held.tensors == offered.tensors
        and (held.chunk_bytes, held.column_tiles) == (offered.chunk_bytes, offered.column_tiles)
    )
