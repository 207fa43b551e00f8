"""Live updates of a running vLLM instance: the `netloader` backend of vLLM's weight-transfer
system (`--weight-transfer-config '{"backend": "netloader"}'`, registered by the plugin; this
module is imported only by a vLLM worker that uses it).

A trainer (or `netloader update`) publishes the new version as a checkpoint-format source
(`netloader serve DIR --version N`, `netloader.publish(state_dict, name, version=N)`) and
drives each instance through vLLM's own sequence: pause, `start_weight_update`,
`update_weights({"version": N, "sources": [...]})`, `finish_weight_update`, resume.

- `update_weights` stages: every rank pulls what changed into host memory, verified, and
  the ranks vote; if any failed, none switches, the last rank raises (see
  `_raise_on_the_last_rank` for why only it), and the caller ends the update with
  `finish_weight_update`, which then switches nothing.
- `finish_weight_update` switches: the staged tensors go through the model's own
  `load_weights` under vLLM's layerwise reload, which re-runs each touched layer's
  post-processing (on the CPU, the oneDNN packing) and copies the result into the
  layer's original storage; untouched layers keep theirs. Then the rank's netloader
  server relays what it staged (`PartOfModel`): the instances still on the version it
  had pull that delta from it instead of from the publisher (`netloader update` chains
  them so).

What changed is known from chunk digests: against the manifest of the version this rank
holds (the checkpoint it loaded from, or its last update), whole decoder layers with any
changed chunk are pulled (a layer is post-processed as a unit), with the small tensors
that share their chunks (kept only to relay whole chunks); without such a manifest,
everything is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from netloader import metrics
from netloader.checkpoint import CHECKPOINT_WEIGHTS
from netloader.client.update import changed_chunks, check_staging, planned_alike
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import ManifestMismatch, NetloaderError
from netloader.integrations.vllm_checkpoint import checkpoint_config
from netloader.manifest import Identity, Manifest
from netloader.ranks import client_for, member

log = logging.getLogger("netloader.vllm")


@dataclass
class NetloaderInitInfo:
    """Nothing to set up: each update names its sources."""


@dataclass
class NetloaderUpdateInfo:
    """version: the version to take (the sources must serve exactly it).
    sources:  "host:port" of checkpoint-format servers of it (any of them serves every
              rank: a checkpoint fits any layout), or of instances that switched to it
              (they serve what they took).
    in_order: take the sources one at a time, in order (a chain: the instance that
              switched last first, the publisher last), instead of all at once.
    abort:    drop what was staged instead (a caller that gave up on an update ends it
              with this, then `finish_weight_update`, which then switches nothing).
    keep_previous: go on serving the complete version this instance's servers offer (the
              one it loaded) to the instances that ask for it, after the switch: the
              parameters the switch overwrites that those servers share are copied first
              (on the CPU, the norms; where post-processing keeps the weights as they
              are, the changed layers'). False: stop offering it."""

    version: str = ""
    sources: list[str] = field(default_factory=list)
    in_order: bool = False
    abort: bool = False
    keep_previous: bool = True

    def __post_init__(self) -> None:
        self.version = str(self.version)  # a JSON number is a version too
        if not isinstance(self.sources, list) or not all(isinstance(s, str) for s in self.sources):
            raise NetloaderError("the update's sources must be a list of host:port strings")


@dataclass
class _Staged:
    version: str
    manifest: Manifest
    tensors: dict[str, torch.Tensor]  # what was pulled: whole chunks' tensors
    loads: list[str]  # those the switch loads (whole decoder layers)
    keep_previous: bool


def _engine_base() -> type:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    return WeightTransferEngine  # type: ignore[no-any-return]


class NetloaderEngine(_engine_base()):  # type: ignore[misc]
    """The worker side: stage in `update_weights`, switch in `finish_weight_update`."""

    init_info_cls = NetloaderInitInfo
    update_info_cls = NetloaderUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: Any, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        extra = dict(vllm_config.load_config.model_loader_extra_config or {})
        self.netloader = NetloaderConfig.load(extra)
        self.staged: _Staged | None = None

    def init_transfer_engine(self, init_info: NetloaderInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        self.staged = None

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """Stage this rank's part of the update, then vote: unless every rank staged it,
        none switches. (Overrides the base class, which synchronizes the accelerator: a
        CPU build cannot; nothing here is asynchronous.)"""
        from vllm.distributed import parallel_state as ps

        rank = ps.get_world_group().rank
        started = time.perf_counter()
        self.staged = None
        failure, version = None, str(update_info.get("version", "?"))
        try:
            info = self.parse_update_info(update_info)
            if info.abort:
                log.info("netloader: rank %d dropped the update it staged", rank)
                return  # every rank gets the same abort: no vote needed
            self.staged = self._stage(rank, info)
        except (NetloaderError, ValueError) as exc:
            failure = f"rank {rank}: {exc}"
        except Exception as exc:  # a netloader bug: refuse the update, keep serving
            log.exception("netloader: unexpected failure staging an update")
            failure = f"rank {rank}: unexpected {type(exc).__name__}: {exc}"
        failed, ranks = _ranks_failed(failure is not None)
        if failed:
            self.staged = None
            metrics.UPDATES_FINISHED.labels("refused").inc()
            log.warning(
                "netloader: rank %d keeps its weights: update to version %s refused: %s",
                rank,
                version,
                failure or f"{failed} other rank(s) could not stage it",
            )
            _raise_on_the_last_rank(
                rank,
                ranks,
                f"update to version {version} refused, the old version keeps serving: "
                f"{failed} of {ranks} ranks could not stage it"
                + (f" ({failure})" if failure else " (their logs say why)"),
            )
            return
        metrics.UPDATE_PHASE_SECONDS.labels("stage").observe(time.perf_counter() - started)

    def receive_weights(self, update_info: NetloaderUpdateInfo) -> None:
        raise NotImplementedError("netloader stages in update_weights")

    def _stage(self, rank: int, info: NetloaderUpdateInfo) -> _Staged:
        from vllm.distributed.weight_transfer.base import layerwise_groups
        from vllm.model_executor.models.utils import is_pp_missing_parameter

        if not info.sources:
            raise NetloaderError("the update names no sources")
        try:
            sources = [parse_endpoint(str(source)) for source in info.sources]
        except ValueError as exc:
            raise NetloaderError(f"the update's sources: {exc}") from None
        started = time.perf_counter()
        if info.in_order:
            sources = self._serving(sources, info.version)
        client = client_for(self.netloader, sources, stripe=1 if info.in_order else None)
        offered = client.manifest(version=info.version)
        try:
            self._check(offered, info.version)
        except ManifestMismatch as exc:
            raise ManifestMismatch(f"{client.sources[0]}: {exc}") from None
        held_now, holds = self._held(rank, offered)
        ours = {t.name: (t.dtype, t.shape) for t in held_now.tensors}
        theirs = {t.name: (t.dtype, t.shape) for t in offered.tensors}
        if ours != theirs:
            other = sorted(set(ours) ^ set(theirs)) or sorted(
                n for n in ours if ours[n] != theirs[n]
            )
            raise ManifestMismatch(
                f"version {info.version} has other tensors than the version this instance "
                f"holds ({len(other)} differ, e.g. {other[0]!r}): a live update replaces "
                "weights, it does not add, drop or reshape them"
            )
        names = [t.name for t in offered.tensors if not is_pp_missing_parameter(t.name, self.model)]
        if planned_alike(held_now, offered):
            changed = set(offered.tensor_names(changed_chunks(held_now, offered)))
            names = [n for group in layerwise_groups(names) if changed & set(group) for n in group]
            compared = f"chunks that differ from {holds}"
        else:
            compared = "everything (the version it holds was cut into other chunks)"
        entries = {t.name: t for t in offered.tensors}
        # Whole chunks, so that this rank can relay them: no extra bytes move.
        whole_chunks = offered.tensor_names(offered.chunks_holding(set(names)))
        check_staging(offered, whole_chunks, self.netloader.update_staging_bytes)
        staging = {
            name: torch.empty(entries[name].shape, dtype=_dtype(entries[name].dtype))
            for name in whole_chunks
        }
        pulled = 0
        if staging:
            report = client.load_into(staging, offered.identity, within=offered)
            pulled = report.bytes
        log.info(
            "netloader: rank %d staged version %s: %d of %d checkpoint tensors, %d of %d bytes "
            "pulled from %s (%s; %d tensors sharing their chunks kept to relay), verified in "
            "%.2f s",
            rank,
            info.version,
            len(names),
            len(offered.tensors),
            pulled,
            offered.total_bytes,
            ", ".join(map(str, sources)),
            compared,
            len(staging) - len(names),
            time.perf_counter() - started,
        )
        return _Staged(info.version, offered, staging, names, info.keep_previous)

    def _serving(self, sources: list[Endpoint], version: str) -> list[Endpoint]:
        """Of sources taken in order (a chain of instances that switched, then the
        publisher), those that serve `version` of this model: one that serves anything
        else (an instance restarted since, a mistyped port) is skipped, logged, rather
        than refusing the update. All of them if none does (the error then names the
        first)."""
        serving = []
        for source in sources:
            try:
                self._check(client_for(self.netloader, [source]).manifest(version=version), version)
            except NetloaderError as exc:
                log.warning("netloader: skipping update source %s: %s", source, exc)
                continue
            serving.append(source)
        return serving or sources

    def _held(self, rank: int, offered: Manifest) -> tuple[Manifest, str]:
        """The manifest of what this rank's model holds, and what that is: the checkpoint
        (version) it loaded from a source or switched to, or else the files it loaded from
        disk, digested now (unless they changed since)."""
        rank_member = member(rank)
        if rank_member.checkpoint is not None:
            version = rank_member.checkpoint.identity.version or "(unversioned)"
            return rank_member.checkpoint, f"the version it holds ({version})"
        if rank_member.on_disk is not None:
            started = time.perf_counter()
            held_now = rank_member.on_disk.manifest_like(offered)
            log.info(
                "netloader: rank %d digested the checkpoint it loaded from %s: %d bytes in %.2f s",
                rank,
                rank_member.on_disk.directory,
                held_now.total_bytes,
                time.perf_counter() - started,
            )
            return held_now, f"the checkpoint it loaded from {rank_member.on_disk.directory}"
        raise NetloaderError(
            "this instance holds no checkpoint version netloader knows (it loaded from a "
            "vLLM peer, or from disk but not from safetensors files in a local directory, "
            "or a switch failed): a live update needs to know what it holds, to know that "
            "the new version covers every weight"
        )

    def _check(self, offered: Manifest, version: str) -> None:
        model = self.netloader.model or str(
            self.model_config.served_model_name or self.model_config.model
        )
        expected = Identity(
            model,
            attributes={"weights": CHECKPOINT_WEIGHTS},
            version=version,
        )
        differences = expected.differences(offered.identity)
        mine, theirs = (
            checkpoint_config(self.model_config),
            offered.identity.attributes.get("config"),
        )
        if mine is not None and theirs is not None and mine != theirs:
            differences.append(f"config fingerprint: this instance's {mine}, offered {theirs}")
        if differences:
            raise ManifestMismatch.from_differences(differences)

    def finish_weight_update(self) -> None:
        """Switch: the staged tensors through the model's own `load_weights` under vLLM's
        layerwise reload; then this rank's netloader server stops offering what it loaded
        (some of those tensors are the model's own, now changed). A switch that fails on
        any rank leaves the instance's weights unknown: every rank forgets its version
        (no later update compares with it) and says so; the caller must not resume it."""
        from vllm.distributed import parallel_state as ps

        staged, self.staged = self.staged, None
        if staged is None:
            return  # refused or aborted: nothing to switch
        rank = ps.get_world_group().rank
        started = time.perf_counter()
        rank_member = member(rank)
        previous = rank_member.checkpoint
        # Until the switch is known to be complete, nothing says what the model holds.
        rank_member.checkpoint = rank_member.on_disk = None
        failure, kept = None, None
        try:
            # Kept whatever happens (a failed switch serves it checked); copied only to be
            # served on after the switch.
            written = _written_by(self.model, staged.loads) if staged.keep_previous else set()
            kept = rank_member.keep_serving(written)
            if staged.tensors:
                self._switch(staged)
        except Exception as exc:
            log.exception("netloader: rank %d failed switching to version %s", rank, staged.version)
            failure = f"rank {rank}: {type(exc).__name__}: {exc}"
        failed, ranks = _ranks_failed(failure is not None)
        if failed:
            if kept is not None and rank_member.server is not None:
                # What it loaded, checked chunk by chunk: what the failed switch wrote is
                # refused rather than served.
                rank_member.server.serve_instead(kept)
            metrics.UPDATES_FINISHED.labels("error").inc()
            log.error(
                "netloader: rank %d: the switch to version %s failed (%s): this instance's "
                "weights may mix versions; restart it",
                rank,
                staged.version,
                failure or f"on {failed} other rank(s)",
            )
            _raise_on_the_last_rank(
                rank,
                ranks,
                f"the switch to version {staged.version} failed on {failed} of {ranks} ranks"
                + (f" ({failure})" if failure else "")
                + ": the weights may mix versions; restart this instance",
            )
            return
        rank_member.switched(
            staged.tensors,
            staged.manifest,
            previous,
            kept=kept if staged.keep_previous else None,
        )
        seconds = time.perf_counter() - started
        metrics.UPDATE_PHASE_SECONDS.labels("switch").observe(seconds)
        metrics.UPDATES_FINISHED.labels("ok").inc()
        metrics.holds_version(staged.manifest.identity.model, staged.version)
        log.info(
            "netloader: rank %d switched to version %s (%d tensors) in %.3f s",
            rank,
            staged.version,
            len(staged.loads),
            seconds,
        )

    def _switch(self, staged: _Staged) -> None:
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        initialize_layerwise_reload(self.model)
        try:
            self.model.load_weights(iter([(n, staged.tensors[n]) for n in staged.loads]))
        finally:
            finalize_layerwise_reload(self.model, self.model_config)

    def shutdown(self) -> None:
        self.staged = None


def _written_by(model: torch.nn.Module, loads: list[str]) -> set[int]:
    """The storages (`untyped_storage().data_ptr()`) of the live parameters and buffers
    that a layerwise reload of the checkpoint tensors `loads` may write: those of every
    decoder layer one of them belongs to (a layer is reloaded as a unit), and, if one of
    them is outside the layers (embeddings, final norm, head), of everything outside."""
    layers = {_layer_of(name) for name in loads}
    return {
        tensor.untyped_storage().data_ptr()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if _layer_of(name) in layers
    }


def _layer_of(name: str) -> str | None:
    """The decoder layer a tensor belongs to (its name up to the first number, as vLLM's
    `layerwise_groups` groups them: "model.layers.3"), or None outside the layers."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return None


def _raise_on_the_last_rank(rank: int, ranks: int, message: str) -> None:
    """vLLM's executor reads the ranks' answers in rank order and stops at the first
    failure, leaving the later ones to be read as answers to its next call: so only the
    last rank raises (its message is the caller's answer); the others return."""
    if rank == ranks - 1:
        raise NetloaderError(message)


def _ranks_failed(failed: bool) -> tuple[int, int]:
    """(how many ranks of this instance failed, how many there are): each rank says
    whether it did."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    group = ps.get_world_group()
    if group.world_size == 1:
        return int(failed), 1
    count = torch.tensor([int(failed)])
    dist.all_reduce(count, group=group.cpu_group)
    return int(count.item()), group.world_size


def _dtype(name: str) -> torch.dtype:
    from netloader.tensors import dtype_from_name

    return dtype_from_name(name)
