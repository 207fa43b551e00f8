"""vLLM integration: `--load-format netloader`, registered through the
`vllm.general_plugins` entry point. A thin adapter over the core.

In the Worker process, `load_weights` fills the model's parameters from the peers that
SOURCE lists for this rank, or falls back to vLLM's default loader (one log line naming
the reason). Either way, before vLLM's `process_weights_after_loading` transforms the
parameters (on the CPU it packs every linear weight into a oneDNN handle and leaves an
empty `weight`), it keeps what a peer needs: references to the pre-processing tensors,
or copies of them with INT8_CACHE. After post-processing it checks those tensors are still
what was loaded, and serves them on LISTEN_PORT + rank. So every instance serves the next
the same bytes it loaded, and each runs post-processing exactly once.

With WAVE_DIR, an instance also relays: it listens before it loads, joins the wave in that
shared directory, pulls from the member that joined before it (then that member's
predecessors, then the seeds), and serves each chunk on as soon as it has it verified,
so a wave of instances started together forms a chain instead of all reading the seed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from netloader import metrics
from netloader.checkpoint import LocalCheckpoint
from netloader.config import NetloaderConfig
from netloader.discovery.registry import mask_url
from netloader.errors import NetloaderError
from netloader.files import model_files
from netloader.integrations.vllm_checkpoint import load_from_checkpoints
from netloader.integrations.vllm_compile_cache import (
    cache_holdings,
    compile_key,
    take_before_vllm_starts,
    take_compile_cache,
)
from netloader.integrations.weight_capture import (
    Capture,
    capture,
    check_intact,
    kept_bytes,
    share_equal,
)
from netloader.manifest import Identity, config_fingerprint
from netloader.ranks import (
    Member,
    checkpoint_of_peer,
    client_for,
    find_sources,
    join_registry_wave,
    join_wave,
    load_rank,
    member,
    register_instance,
    register_server,
    relay_rank,
    serve_rank,
    servers,
    sort_sources,
)
from netloader.server import Holdings, LoadedTensors, Relay, Server
from netloader.server.drain import drain_on_sigterm

log = logging.getLogger("netloader.vllm")

LOAD_FORMAT = "netloader"
_taken_before_inspection: list[bool] = []  # once per process


def register() -> None:
    """Entry point run by vLLM in every process (API server, engine core, workers):
    cheap, idempotent, starts nothing."""
    _route_logs_to_stderr()
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(_loader_class())
    _take_compile_cache_before_inspection()
    _register_update_backend()


def _register_update_backend() -> None:
    """`netloader` as a backend of vLLM's weight-transfer system (live updates); its module
    is imported only by a worker that uses it."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    with contextlib.suppress(ValueError):  # registered already
        WeightTransferEngineFactory.register_engine(
            LOAD_FORMAT, "netloader.integrations.vllm_update", "NetloaderEngine"
        )


def _take_compile_cache_before_inspection() -> None:
    """SHARE_COMPILE_CACHE: vLLM's API server inspects the model (seconds, unless vLLM's
    model-inspection cache has it) in `EngineArgs.create_model_config`, before any worker
    exists; take the seeds' compile caches, that cache included, just before it does."""
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_model_config
    if hasattr(create, "__wrapped__"):
        return

    @functools.wraps(create)
    def create_model_config(engine_args: Any) -> Any:
        if engine_args.load_format == LOAD_FORMAT and not _taken_before_inspection:
            _taken_before_inspection.append(True)
            try:
                import vllm.envs as envs

                config = NetloaderConfig.load(dict(engine_args.model_loader_extra_config or {}))
                take_before_vllm_starts(config, Path(envs.VLLM_CACHE_ROOT))
            except NetloaderError:
                pass  # a configuration error: the loader reports it where it fails the load
            except Exception:  # never let a netloader bug stop vLLM from starting
                log.exception("netloader: unexpected failure taking the compile cache early")
        return create(engine_args)

    EngineArgs.create_model_config = create_model_config


def _route_logs_to_stderr() -> None:
    """vLLM configures only its own logger namespace; give ours a handler of the same kind."""
    root = logging.getLogger("netloader")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [netloader] %(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False


@dataclass(frozen=True)
class Slot:
    """Which model of which rank a load is for: the target, or a speculative-decoding draft
    model, which vLLM loads second in the same worker. Each has its own server, port,
    OUTPUT_PREFIX file, sources and wave."""

    rank: int
    draft: bool
    base_name: str  # the target's name; a draft's identity is "<target>/draft"

    def __str__(self) -> str:
        return f"rank {self.rank}" + (" draft" if self.draft else "")

    @property
    def member(self) -> Member:
        """This slot's part in the fleet (its server, what it serves, its version)."""
        return member(self.rank, draft=self.draft)


def _loader_class() -> type:
    from vllm.config import replace as replace_config
    from vllm.model_executor.model_loader import BaseModelLoader, DefaultModelLoader

    class NetloaderModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Loads weights from peers, falls back to the default loader, serves afterwards."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.config = NetloaderConfig.load(dict(load_config.model_loader_extra_config or {}))
            self.default = DefaultModelLoader(
                replace_config(load_config, load_format="auto", model_loader_extra_config={})
            )
            self.slot: Slot | None = None
            self.capture: Capture | None = None
            self.shared: list[str] = []  # a draft's tensors served from its target's
            self.relay: Relay | None = None

        def download_model(self, model_config: Any) -> None:
            self.default.download_model(model_config)

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            slot = self.slot or _slot(self.config, None, model_config)
            # Until this load says which checkpoint it holds.
            slot.member.checkpoint = slot.member.on_disk = None
            identity = _identity(slot, model_config)
            _expose_metrics(self.config, slot)
            in_wave = self.config.wave_dir is not None or self.config.join_wave
            self.relay = _start_relay(self.config, slot) if in_wave else None
            with _phase("pull"):
                reason = _load_from_peers(model, model_config, identity, self, slot)
            if reason is not None:
                log.warning(
                    "netloader: %s loads from disk with the default loader: %s", slot, reason
                )
                if self.relay is not None:  # its clients move on to their next source
                    self.relay.arrivals.fail(f"it loads from disk: {reason}")
                files = LocalCheckpoint.of(Path(str(model_config.model)))
                with _phase("disk"):
                    self.default.load_weights(model, model_config)
                if files is not None and not slot.draft:  # what a live update compares with
                    slot.member.on_disk = files.unchanged()
            params = {name: p.detach() for name, p in model.named_parameters()}
            checkpoint = slot.member.checkpoint
            if reason is None and checkpoint is not None:
                identity = replace(identity, version=checkpoint.identity.version)
                metrics.holds_version(identity.model, identity.version)
            self.capture = capture(params, identity, self.config)
            if slot.draft:
                self.capture, self.shared = _share_with_target(self.capture, slot)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            self.slot = _slot(self.config, vllm_config, model_config)
            _drain_on_sigterm(self.config, vllm_config)
            model = super().load_model(vllm_config, model_config, prefix=prefix)
            if self.capture is not None:
                cache = None
                if self.config.share_compile_cache:
                    cache = _share_compile_cache(self, model, vllm_config, self.capture.identity)
                files = _model_files(model_config)
                with _phase("serve"):
                    _serve(
                        model, self.capture, self.config, self.slot, self.relay, files, cache,
                        self.shared,
                    )  # fmt: skip
                if self.slot.rank == 0 and not self.slot.draft:  # INSTANCE_URL: for updates
                    register_instance(self.config, self.capture.identity)
                self.capture = self.relay = None
                self.shared = []
            return model

    return NetloaderModelLoader


def _drain_on_sigterm(config: NetloaderConfig, vllm_config: Any) -> None:
    """On SIGTERM, this worker's servers withdraw from the registry at once and finish
    their transfers in progress, within DRAIN_TIMEOUT and the time vLLM gives its
    processes to stop (`--shutdown-timeout`; with 0, vLLM kills them at once)."""
    grace = getattr(vllm_config, "shutdown_timeout", 0) or 0
    timeout = min(config.drain_timeout, grace)
    if not drain_on_sigterm(servers, timeout):
        return
    if grace == 0 and (config.registry is not None or config.listen_port is not None):
        log.info(
            "netloader: vLLM stops this worker at once on SIGTERM (--shutdown-timeout 0): "
            "transfers in progress are cut off; set --shutdown-timeout to let them finish"
        )


def _slot(config: NetloaderConfig, vllm_config: Any, model_config: Any) -> Slot:
    from vllm.distributed import parallel_state as ps

    spec = None if vllm_config is None else vllm_config.speculative_config
    draft = spec is not None and model_config is spec.draft_model_config
    target = model_config
    if spec is not None and draft and spec.target_model_config is not None:
        target = spec.target_model_config
    base = config.model or str(target.served_model_name or target.model)
    return Slot(ps.get_world_group().rank, draft, base)


def _share_with_target(captured: Capture, slot: Slot) -> tuple[Capture, list[str]]:
    """A draft serves the tensors equal to its target's from the target's (see
    `share_equal`): an MTP draft's embedding and lm_head, which vLLM replaces by the
    target's right after this load, are then freed rather than kept alive by this server."""
    target = member(slot.rank).serving
    if not target:
        return captured, []
    captured, shared = share_equal(captured, target)
    if shared:
        log.info(
            "netloader: %s serves %d tensors (%d bytes) from its target's equal ones, not "
            "its own copies: %s",
            slot,
            len(shared),
            sum(captured.tensors[n].numel() * captured.tensors[n].element_size() for n in shared),
            ", ".join(shared),
        )
    return captured, shared


def _identity(slot: Slot, model_config: Any) -> Identity:
    from vllm.distributed import parallel_state as ps

    import vllm

    return Identity(
        model=f"{slot.base_name}/draft" if slot.draft else slot.base_name,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_size=ps.get_pp_group().world_size,
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        attributes={
            "dtype": str(model_config.dtype).removeprefix("torch."),
            "quantization": str(model_config.quantization),
            "weights": "vllm-parameters-before-post-processing",
            "vllm": str(vllm.__version__),
            "config": config_fingerprint(model_config.hf_config.to_dict()),
        },
    )


def _with_host_address(config: NetloaderConfig) -> NetloaderConfig:
    """Inside vLLM the host's address is VLLM_HOST_IP (get_ip): bind and advertise it
    unless LISTEN_HOST / ADVERTISE_HOST say otherwise."""
    from vllm.utils.network_utils import get_ip

    if not config.is_set("listen_host"):
        config = replace(config, listen_host=get_ip())
    if config.advertise_host is None and config.listen_host in ("0.0.0.0", "::"):
        config = replace(config, advertise_host=get_ip())
    return config


def _start_relay(config: NetloaderConfig, slot: Slot) -> Relay | None:
    """The server this wave member relays through, listening before it loads."""
    try:
        relay = relay_rank(_with_host_address(config), slot.rank, draft=slot.draft)
    except (OSError, NetloaderError) as exc:
        log.error("netloader: %s cannot listen, so does not join the wave: %s", slot, exc)
        return None
    if relay is not None:
        slot.member.attach(relay)
    return relay


def _load_from_peers(
    model: torch.nn.Module, model_config: Any, identity: Identity, loader: Any, slot: Slot
) -> str | None:
    """Fill the model from this slot's sources; None on success, else why not. A wave
    member pulls from its wave. Otherwise SOURCE's entries are asked what they serve: peers
    with this very layout are preferred (they send fewer bytes, already sharded); failing
    those, checkpoint-format sources, streamed through the model's own `load_weights`."""
    config: NetloaderConfig = loader.config
    params = {name: p.detach() for name, p in model.named_parameters()}
    try:
        if loader.relay is not None:
            why = _load_from_wave(params, identity, config, slot, loader.relay)
            return _counted("peer", why, "wave")
        sources = find_sources(config, identity, slot.rank, draft=slot.draft, checkpoints=True)
        if not sources:
            where = (
                "SOURCE has no" if config.registry is None else "neither REGISTRY nor SOURCE has"
            )
            return _counted("disk", f"{where} sources for {slot}", "no_sources")
        found = sort_sources(config, sources)
        reasons = list(found.unreachable)
        if found.peers:
            try:
                report = client_for(config, found.peers).load_into(params, identity)
                log.debug("netloader: %s loaded weights from peers: %s", slot, report.summary())
                if not slot.draft:  # the checkpoint version the peer holds: so does this one
                    slot.member.checkpoint = checkpoint_of_peer(config, report)
                return _counted("peer", None)
            except NetloaderError as exc:
                reasons.append(str(exc))
        if found.checkpoints:
            why = load_from_checkpoints(model, model_config, identity, loader, found.checkpoints)
            if why is None:
                if not slot.draft:  # its version, and what a live update compares with
                    slot.member.checkpoint = found.checkpoints[0][1]
                return _counted("checkpoint", None)
            reasons.append(why)
        failed = "checkpoint" if found.checkpoints else "peers" if found.peers else "unreachable"
        return _counted("disk", "; ".join(reasons), failed)
    except NetloaderError as exc:
        return _counted("disk", str(exc), "error")
    except Exception as exc:  # never let a netloader bug stop the instance from starting
        log.exception("netloader: unexpected failure")
        return _counted("disk", f"unexpected {type(exc).__name__}: {exc}", "error")


def _counted(path: str, reason: str | None, kind: str = "") -> str | None:
    """Count the load path taken (peer, checkpoint, or disk with the kind of reason: a
    bounded set, for metrics) and pass `reason` on."""
    if reason is None:
        metrics.VLLM_LOADS.labels(path, "").inc()
    else:
        metrics.VLLM_LOADS.labels("disk", kind).inc()
    return reason


@contextlib.contextmanager
def _phase(name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        metrics.VLLM_LOAD_PHASE_SECONDS.labels(name).observe(time.perf_counter() - started)


def _expose_metrics(config: NetloaderConfig, slot: Slot) -> None:
    """METRICS_PORT + rank, in this worker (where the loader runs and counts)."""
    endpoint = config.metrics_endpoint_for(slot.rank)
    if endpoint is None:
        return
    endpoint = _with_host_address(config).metrics_endpoint_for(slot.rank) or endpoint
    try:
        metrics.serve_metrics(endpoint)
    except OSError as exc:
        log.error("netloader: %s cannot expose metrics on %s: %s", slot, endpoint, exc)


def _load_from_wave(
    params: dict[str, torch.Tensor],
    identity: Identity,
    config: NetloaderConfig,
    slot: Slot,
    relay: Relay,
) -> str | None:
    """Join this slot's wave (in WAVE_DIR, or REGISTRY's with JOIN_WAVE) and pull from it,
    relaying as chunks arrive."""
    fanout = config.wave_fanout or None
    wave = config.wave_dir or (config.registry and mask_url(config.registry))
    position: int | None
    try:
        if config.wave_dir is not None:
            position, sources = join_wave(config, slot.rank, relay, fanout=fanout, draft=slot.draft)
        else:
            position, sources = join_registry_wave(
                config, slot.rank, relay, identity, fanout=fanout, draft=slot.draft
            )
    except (OSError, NetloaderError) as exc:
        return f"cannot join the wave in {wave}: {exc}"
    log.info(
        "netloader: %s is %s of the wave in %s, relaying on %s; sources: %s",
        slot,
        "outside" if position is None else f"member {position}",
        wave,
        relay.address,
        ", ".join(map(str, sources)) or "none",
    )
    if not sources:
        return f"the wave in {wave} has no seed or earlier member for {slot}"
    report = load_rank(
        params, identity, config, slot.rank, sources=sources, relay=relay, draft=slot.draft
    )
    log.debug("netloader: %s loaded weights from its wave: %s", slot, report.summary())
    return None


def _model_files(model_config: Any) -> dict[str, torch.Tensor] | None:
    """The model directory's other files (config, tokenizer), to serve beside the weights
    to nodes that start with nothing; None when the model is not a local directory."""
    directory = Path(str(model_config.model))
    if not directory.is_dir():
        return None
    try:
        return model_files(directory)
    except OSError as exc:
        log.warning("netloader: not serving the files of %s: %s", directory, exc)
        return None


def _serve(
    model: torch.nn.Module,
    captured: Capture,
    config: NetloaderConfig,
    slot: Slot,
    relay: Relay | None,
    files: dict[str, torch.Tensor] | None,
    compile_cache: Callable[[], Holdings] | None,
    shared: list[str],
) -> None:
    """After post-processing: check the kept tensors are intact, then serve them, with the
    model directory's `files` and the `compile_cache` when shared: through the wave relay,
    when this load had one; through the listener this slot already has, when the worker
    loads the same model again; else on a new listener. A draft's `shared` tensors are its
    target's: the target's line counts them."""
    started = time.perf_counter()
    unavailable = check_intact(captured)
    if unavailable is not None:
        log.error("netloader: %s cannot serve its weights: %s", slot, unavailable)
    live = {n: p.detach() for n, p in model.named_parameters()}
    kept_alive = kept_bytes(captured, live | {n: captured.tensors[n] for n in shared})
    slot.member.serving = None
    server: Server | None = relay or slot.member.server
    if server is not None:
        server.serve_instead(
            LoadedTensors(
                captured.tensors,
                captured.identity,
                manifest=captured.manifest,
                unavailable=unavailable,
            ),
            files=None if files is None else LoadedTensors(files, captured.identity),
        )
        if relay is not None and unavailable is None:  # a wave member: a server from now on
            register_server(config, slot.rank, relay, captured.identity)
    else:
        try:
            new = serve_rank(
                captured.tensors,
                captured.identity,
                _with_host_address(config),
                slot.rank,
                manifest=captured.manifest,
                unavailable=unavailable,
                draft=slot.draft,
                files=files,
            )
        except (OSError, NetloaderError) as exc:
            log.error("netloader: %s cannot serve: %s", slot, exc)
            return
        if new is None:
            return
        server = slot.member.attach(new)
    if compile_cache is not None:
        server.offer_compile_cache(compile_cache)
    if unavailable is None:  # a target's draft, loaded next, may serve from these
        slot.member.serving = captured.tensors
        slot.member.offer_checkpoint()  # those that load from it know what they hold
    log.info(
        "netloader: %s serves %d tensors (%d bytes) on %s; %d bytes kept beyond the "
        "running model (INT8_CACHE=%s); checked in %.2f s",
        slot,
        len(captured.tensors),
        captured.manifest.total_bytes,
        server.address,
        kept_alive,
        config.int8_cache,
        time.perf_counter() - started,
    )


def _share_compile_cache(
    loader: Any, model: torch.nn.Module, vllm_config: Any, identity: Identity
) -> Callable[[], Holdings] | None:
    """SHARE_COMPILE_CACHE: take the compile cache from this slot's sources (when it has
    any and they are trusted), before vLLM compiles; then offer this instance's own.
    Returns what to serve, or None (logged) when this instance has no cache to share."""
    config: NetloaderConfig = loader.config
    slot: Slot = loader.slot
    try:
        found = compile_key(model, vllm_config)
    except Exception as exc:  # vLLM internals moved: share nothing, start as usual
        log.warning("netloader: %s shares no compile cache: %r", slot, exc)
        return None
    if isinstance(found, str):
        log.info("netloader: %s shares no compile cache: %s", slot, found)
        return None
    key, keys = found
    sources = find_sources(config, identity, slot.rank, draft=slot.draft)
    if sources and not config.authenticates_sources():
        log.warning(
            "netloader: %s compiles itself: a compile cache is code this instance would run, "
            "so it is taken only from a source that proved the shared secret or a trusted "
            "certificate (set NETLOADER_SECRET, SECRET_FILE or TLS_CA)",
            slot,
        )
    elif sources:
        try:
            taken = take_compile_cache(client_for(config, sources), key, identity, keys)
            log.info("netloader: %s %s", slot, taken)
        except NetloaderError as exc:
            log.warning("netloader: %s compiles itself: no compile cache taken: %s", slot, exc)
        except Exception as exc:  # never let a netloader bug stop the instance from starting
            log.exception("netloader: unexpected failure taking the compile cache")
            log.warning("netloader: %s compiles itself: unexpected %r", slot, exc)
    return cache_holdings(key, identity, keys)
