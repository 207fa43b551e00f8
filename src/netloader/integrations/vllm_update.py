"""Live updates of a running vLLM instance: the `netloader` backend of vLLM's weight-transfer
system (`--weight-transfer-config '{"backend": "netloader"}'`, registered by the plugin; this
module is imported only by a vLLM worker that uses it).

A trainer (or `netloader update`) publishes the new version as a checkpoint-format source
(`netloader serve DIR --version N`, `netloader.publish(state_dict, name, version=N)`) and
drives each instance through vLLM's own sequence: pause, `start_weight_update`,
`update_weights({"version": N, "sources": [...]})`, `finish_weight_update`, resume.

- `update_weights` stages: every rank pulls what changed into host memory, verified, and
  the ranks vote; if any failed, none switches, the last rank raises (see
  `receive_weights` for why only it), and the caller ends the update with
  `finish_weight_update`, which then switches nothing.
- `finish_weight_update` switches: the staged tensors go through the model's own
  `load_weights` under vLLM's layerwise reload, which re-runs each touched layer's
  post-processing (on the CPU, the oneDNN packing) and copies the result into the
  layer's original storage; untouched layers keep theirs.

What changed is known from chunk digests: against the manifest of the version this rank
holds (the checkpoint it loaded from, or its last update), whole decoder layers with any
changed chunk are pulled (a layer is post-processed as a unit); without such a manifest,
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
from netloader.client.update import planned_alike
from netloader.config import NetloaderConfig
from netloader.endpoint import parse_endpoint
from netloader.errors import ManifestMismatch, NetloaderError
from netloader.integrations.vllm_checkpoint import checkpoint_config, held, hold
from netloader.manifest import Identity, Manifest
from netloader.ranks import client_for

log = logging.getLogger("netloader.vllm")


@dataclass
class NetloaderInitInfo:
    """Nothing to set up: each update names its sources."""


@dataclass
class NetloaderUpdateInfo:
    """version: the version to take (the sources must serve exactly it).
    sources:  "host:port" of checkpoint-format servers of it (any of them serves every
              rank: a checkpoint fits any layout)."""

    version: str
    sources: list[str] = field(default_factory=list)


@dataclass
class _Staged:
    version: str
    manifest: Manifest
    tensors: dict[str, torch.Tensor]


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
        # The base class synchronizes the accelerator, which a CPU build cannot.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: NetloaderUpdateInfo) -> None:
        """Stage this rank's part of the update and vote: raises on every rank unless
        every rank staged."""
        from vllm.distributed import parallel_state as ps

        rank = ps.get_world_group().rank
        started = time.perf_counter()
        failure = None
        try:
            self.staged = self._stage(rank, update_info)
        except NetloaderError as exc:
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
                update_info.version,
                failure or f"{failed} other rank(s) could not stage it",
            )
            # vLLM's executor reads the ranks' answers in rank order and stops at the first
            # failure, leaving the later ones to be read as answers to the next call: so
            # only the last rank raises, and the caller ends the update on the others
            # (`finish_weight_update`, which then switches nothing).
            if rank == ranks - 1:
                raise NetloaderError(
                    f"update to version {update_info.version} refused, the old version "
                    f"keeps serving: {failed} of {ranks} ranks could not stage it"
                    + (f" ({failure})" if failure else " (their logs say why)")
                )
            return
        metrics.UPDATE_PHASE_SECONDS.labels("stage").observe(time.perf_counter() - started)

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
        client = client_for(self.netloader, sources)
        offered = client.manifest()
        self._check(offered, info.version)
        held_now = held(rank)
        names = [t.name for t in offered.tensors if not is_pp_missing_parameter(t.name, self.model)]
        if held_now is not None and planned_alike(held_now, offered):
            pairs = zip(held_now.digests, offered.digests, strict=True)
            changed = set(offered.tensor_names([i for i, (a, b) in enumerate(pairs) if a != b]))
            names = [n for group in layerwise_groups(names) if changed & set(group) for n in group]
            compared = "chunks that differ from the version it holds"
        else:
            compared = (
                "everything (no manifest of the version it holds)"
                if held_now is None
                else "everything (the version it holds was cut into other chunks)"
            )
        dtypes = {t.name: t for t in offered.tensors}
        staging = {
            name: torch.empty(dtypes[name].shape, dtype=_dtype(dtypes[name].dtype))
            for name in names
        }
        pulled = 0
        if staging:
            report = client.load_into(staging, offered.identity, within=offered)
            pulled = report.bytes
        log.info(
            "netloader: rank %d staged version %s: %d of %d checkpoint tensors, %d of %d bytes "
            "pulled (%s), verified in %.2f s",
            rank,
            info.version,
            len(staging),
            len(offered.tensors),
            pulled,
            offered.total_bytes,
            compared,
            time.perf_counter() - started,
        )
        return _Staged(info.version, offered, staging)

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
        layerwise reload."""
        from vllm.distributed import parallel_state as ps
        from vllm.model_executor.model_loader.reload.layerwise import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )

        staged, self.staged = self.staged, None
        if staged is None:
            return
        rank = ps.get_world_group().rank
        started = time.perf_counter()
        initialize_layerwise_reload(self.model)
        try:
            self.model.load_weights(iter(list(staged.tensors.items())))
        except BaseException:
            # Part of it may be in: what the model holds is no longer any version's, so
            # the next update compares with nothing and pulls everything.
            hold(rank, None)
            log.error("netloader: rank %d failed switching to version %s", rank, staged.version)
            raise
        finally:
            finalize_layerwise_reload(self.model, self.model_config)
        hold(rank, staged.manifest)
        seconds = time.perf_counter() - started
        metrics.UPDATE_PHASE_SECONDS.labels("switch").observe(seconds)
        metrics.UPDATES_FINISHED.labels("ok").inc()
        metrics.holds_version(staged.manifest.identity.model, staged.version)
        log.info(
            "netloader: rank %d switched to version %s (%d tensors) in %.3f s",
            rank,
            staged.version,
            len(staged.tensors),
            seconds,
        )

    def shutdown(self) -> None:
        self.staged = None


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
