"""The fleet layer: what each parallel rank does (serve, load, take live updates), driven by
the seed configuration: LISTEN_PORT + rank, OUTPUT_PREFIX files, the SOURCE entry for the
rank, WAVE_DIR waves and the REGISTRY; and `Member`, what this process knows of each of its
ranks' models (its one server, what that serves, the checkpoint version the model holds).
This is the layer the vLLM integration (and any engine's) stands on."""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from netloader.api import Tensors, tensors_of
from netloader.checkpoint import CHECKPOINT_WEIGHTS, LocalCheckpoint
from netloader.client import Client, LoadReport
from netloader.config import DRAFT_SUFFIX, NetloaderConfig
from netloader.discovery import registry as reg
from netloader.discovery.wave import Wave
from netloader.endpoint import Endpoint, advertised_host, parse_endpoint, write_address_file
from netloader.errors import NetloaderError, SourceUnavailable, UsageError
from netloader.manifest import DEFAULT_CHUNK_BYTES, Identity, Manifest
from netloader.protocol import Part
from netloader.server import LoadedTensors, PartOfModel, Relay, Server, ServerOptions
from netloader.server.drain import at_drain
from netloader.server.holdings import keep_through_switch
from netloader.settings import resolve_secret

log = logging.getLogger(__name__)


@dataclass
class Member:
    """This process's part in the fleet for one model of one rank (a target model, or the
    speculative-decoding draft beside it). Each rank loads its model, serves it, and takes
    live updates; between these it keeps:

    server:     its one server (listening before a wave load, serving after it);
    serving:    the tensors of the complete version that server offers (a draft serves
                its target's equal ones): what it loaded, kept after live updates (see
                `keep_serving`) unless told not to;
    checkpoint: the manifest of the checkpoint version the model holds, when known: a live
                update compares its digests with the new version's, and labels the
                server's identity with its version;
    on_disk:    the checkpoint files the model was loaded from, for a model loaded from
                disk (a live update digests them instead, if they did not change)."""

    rank: int
    draft: bool = False
    server: Server | None = None
    serving: Mapping[str, torch.Tensor] | None = None
    checkpoint: Manifest | None = None
    on_disk: LocalCheckpoint | None = None

    def attach(self, server: Server) -> Server:
        """Make `server` this member's one server (a previous other one is closed)."""
        if self.server is not None and self.server is not server:
            self.server.close()
        self.server = server
        return server

    def offer_checkpoint(self) -> None:
        """Let its server tell the instances that load from it which checkpoint version the
        model holds (the CHECKPOINT part), when known: they then hold it too, and can take
        live updates (`checkpoint_of_peer`)."""
        if self.server is not None:
            held = self.checkpoint
            self.server.offer_checkpoints({} if held is None else {held.identity.version: held})

    def keep_serving(self, written: Collection[int]) -> PartOfModel | None:
        """Before a live update's switch, which writes the storages at `written`: the
        complete version this member's server offers (what it loaded, or kept at an
        earlier switch), safe from the switch (`keep_through_switch`: its tensors that are
        the engine's own parameters there are cloned). None if it offers none."""
        if self.server is None:
            return None
        return keep_through_switch(self.server.previous or self.server.holdings, written)

    def switched(
        self,
        tensors: Mapping[str, torch.Tensor],
        manifest: Manifest,
        held: Manifest | None,
        *,
        kept: PartOfModel | None = None,
    ) -> None:
        """A live update switched the model from the checkpoint version `held` describes
        (None: not known as a manifest) to the one `manifest` describes, taking `tensors`
        of it (in host memory, verified): from now on the model holds that version, and its
        server relays those tensors (`PartOfModel`) to the instances still on the previous
        one, and offers `kept` (from `keep_serving`, taken before the switch) to clients
        that ask for its version or for any complete one, with `held` as its checkpoint.
        Without `kept`, it leaves every registry and wave that lists it as a server of the
        version it loaded: it no longer offers it whole."""
        self.checkpoint, self.on_disk = manifest, None
        if self.server is None:
            return
        previous = "" if held is None else held.identity.version
        lacking = (
            f"this instance switched to version {manifest.identity.version} and holds only "
            f"what changed from version {previous or '(unversioned)'}"
        )
        self.server.serve_instead(PartOfModel(tensors, manifest, lacking=lacking), previous=kept)
        self.serving = None if kept is None else kept.tensors
        if kept is None:
            self.server.withdraw()
            self.server.offer_checkpoints({})
        else:  # the kept version's checkpoint: offered since it loaded, or the one it left
            version = kept.manifest().identity.version
            known = self.server.checkpoints.get(version)
            if known is None and held is not None and held.identity.version == version:
                known = held
            self.server.offer_checkpoints({} if known is None else {version: known})
        log.info(
            "netloader: rank %d serves on %s what changed from version %s to %s: %d tensors, "
            "%d bytes kept until its next switch; %s",
            self.rank,
            self.server.address,
            previous or "(unversioned)",
            manifest.identity.version,
            len(tensors),
            sum(t.nbytes for t in tensors.values()),
            "and no longer the version it loaded"
            if kept is None
            else f"and, to those asking for it, version {version or '(unversioned)'} whole",
        )


_members: dict[tuple[int, bool], Member] = {}  # this process's, by (global rank, draft)


def member(rank: int, *, draft: bool = False) -> Member:
    """This process's member for `rank`'s target model (or its `draft`), made on first use."""
    return _members.setdefault((rank, draft), Member(rank, draft))


def servers() -> list[Server]:
    """The servers of this process's members (e.g. to drain on SIGTERM)."""
    return [m.server for m in _members.values() if m.server is not None]


def serve_rank(
    model: Tensors,
    identity: Identity,
    config: NetloaderConfig,
    rank: int,
    *,
    secret: bytes | None = None,
    manifest: Manifest | None = None,
    unavailable: str | None = None,
    draft: bool = False,
    files: Mapping[str, torch.Tensor] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    column_tiles: int = 1,
) -> Server | None:
    """Serve `model` for `rank` on LISTEN_PORT + rank (a free port when unset) and write
    OUTPUT_PREFIX's file. `manifest`: digests already computed over these tensors;
    `unavailable`: tell clients this reason instead of serving; `draft`: the model is a
    speculative-decoding draft (its own port and file, see NetloaderConfig); `files`: the
    model directory's other files (netloader.files.model_files), offered beside the
    weights; `chunk_bytes` and `column_tiles`: how the chunks (the unit of transfer and
    verification) are planned (`manifest.plan_chunks`). Returns None when
    the port is outside 1024-65535 (logged): this rank does not serve."""
    port = config.listen_port_for(rank, draft=draft)
    if port is None:
        return None
    holdings = LoadedTensors(
        tensors_of(model),
        identity,
        manifest=manifest,
        unavailable=unavailable,
        chunk_bytes=chunk_bytes,
        column_tiles=column_tiles,
    )
    offered = None if files is None else LoadedTensors(files, identity)
    server = Server(holdings, files=offered, **_server_options(config, port, secret))
    _publish(config, rank, server, draft)
    if unavailable is None:
        register_server(config, rank, server, identity)
    return server


def register_server(
    config: NetloaderConfig, rank: int, server: Server, identity: Identity
) -> reg.Heartbeat[reg.Record] | None:
    """Keep `server` in REGISTRY as a live server of `identity` for `rank`: published once
    it is serving (its digests are computed), renewed with its transfers in progress
    every third of the TTL, withdrawn when it closes. None without a REGISTRY, or when
    the registry cannot be used (logged; the server serves anyway)."""
    if config.registry is None:
        return None
    group = _group(identity, rank)
    try:
        registry = reg.Registry(config.registry, timeout=config.connect_timeout)
    except ImportError as exc:
        log.error("netloader: cannot use REGISTRY (serving anyway): %s", exc)
        return None
    layout = "checkpoint" if identity.attributes.get("weights") == CHECKPOINT_WEIGHTS else ""
    heartbeat = reg.Heartbeat(
        registry,
        reg.server_record(group, str(server.address), layout=layout, version=identity.version),
        update=reg.with_transfers(lambda: server.transfers_in_progress),
        ready=lambda: _serving(server),
    )
    server.at_close(heartbeat.close)
    return heartbeat


_instances: list[reg.Heartbeat[reg.InstanceRecord]] = []  # this process's (one at most)


def register_instance(
    config: NetloaderConfig, identity: Identity
) -> reg.Heartbeat[reg.InstanceRecord] | None:
    """Keep this engine instance in REGISTRY as INSTANCE_URL (its HTTP API, for `netloader
    update --registry`), called by the process of global rank 0's target model with that
    model's `identity` (its name and layout). The record names rank 0's server and the
    version rank 0 holds (`member(0).checkpoint`), both read again at every renewal (every
    third of the TTL), so that it shows a live update's switch within that time. Withdrawn
    when the process drains on SIGTERM (`drain_on_sigterm`, as a vLLM worker does) or the
    returned heartbeat is closed; not when rank 0's server leaves the registry (a switch
    with `keep_previous` false: the instance lives on). One per process: called again
    (the model loaded again), it keeps the live one. None without REGISTRY and
    INSTANCE_URL, or when the registry cannot be used (logged)."""
    if config.registry is None or config.instance_url is None:
        return None
    if _instances and not _instances[0].stopped:
        return _instances[0]
    try:
        registry = reg.Registry(config.registry, timeout=config.connect_timeout)
    except ImportError as exc:
        log.error("netloader: cannot use REGISTRY (INSTANCE_URL not published): %s", exc)
        return None
    rank0 = member(0)

    def version() -> str:
        held = rank0.checkpoint
        return "" if held is None else held.identity.version

    def address() -> str:
        return "" if rank0.server is None else str(rank0.server.address)

    record = reg.instance_record(
        identity.model, config.instance_url, tp_size=identity.tp_size, pp_size=identity.pp_size
    )
    heartbeat = reg.Heartbeat(registry, record, update=reg.with_holding(version, address))
    at_drain(heartbeat.close)
    _instances[:] = [heartbeat]
    return heartbeat


def checkpoint_of_peer(config: NetloaderConfig, report: LoadReport) -> Manifest | None:
    """The manifest of the checkpoint version an engine's weights that `report` says were
    loaded from a peer of the same layout came from, as that peer tells it (the CHECKPOINT
    part; the peer is as trusted as the bytes it sent, which were verified): what this
    instance then holds too, for its live updates to compare with. None (logged) if the
    peer does not know or cannot say."""
    if not report.sources:
        return None
    source = report.sources[0]
    try:
        held = client_for(config, [parse_endpoint(source)]).manifest(
            Part.CHECKPOINT, version=report.version
        )
    except (NetloaderError, ValueError) as exc:
        log.info(
            "netloader: %s did not say which checkpoint it loaded (%s): live updates of "
            "this instance will be refused",
            source,
            exc,
        )
        return None
    if held.identity.version != report.version or (
        held.identity.attributes.get("weights") != CHECKPOINT_WEIGHTS
    ):
        log.warning(
            "netloader: %s named checkpoint version %r for weights of version %r: ignored",
            source,
            held.identity.version,
            report.version,
        )
        return None
    log.info(
        "netloader: %s says these weights are checkpoint version %s: live updates compare "
        "with its manifest",
        source,
        held.identity.version or "(unversioned)",
    )
    return held


def find_sources(
    config: NetloaderConfig,
    identity: Identity,
    rank: int,
    *,
    draft: bool = False,
    checkpoints: bool = False,
) -> list[Endpoint]:
    """Where `rank` of `identity` can load from: REGISTRY's live servers of that identity
    and rank (least loaded first), then SOURCE's entries for `rank`. `checkpoints`: also
    the registry's served checkpoints of the model (which any layout can load through its
    engine). A registry that cannot be reached is one log line and adds nothing; what the
    registry says is only where to try (identity, digests and the secret still decide)."""
    configured = list(config.sources_for(rank, draft=draft))
    if config.registry is None:
        return configured
    groups = [_group(identity, rank)]
    if checkpoints and groups[0] != reg.Group(identity.model):
        groups.append(reg.Group(identity.model))
    found: list[Endpoint] = []
    try:
        registry = reg.Registry(config.registry, timeout=config.connect_timeout)
    except ImportError as exc:
        log.warning("netloader: cannot use REGISTRY (%s); using SOURCE", exc)
        return configured
    try:
        found = _endpoints(registry.servers(*groups))
    except reg.RegistryError as exc:
        log.warning("netloader: %s; using SOURCE only", exc)
    finally:
        registry.close()
    return list(dict.fromkeys([*found, *configured]))


def relay_rank(
    config: NetloaderConfig, rank: int, *, secret: bytes | None = None, draft: bool = False
) -> Relay | None:
    """Like `serve_rank`, for a model about to be loaded: listening now, serving each chunk
    once `load_rank(..., relay=it)` has it verified; `relay.finish(...)` serves the loaded
    model from then on."""
    port = config.listen_port_for(rank, draft=draft)
    if port is None:
        return None
    relay = Relay(**_server_options(config, port, secret))
    _publish(config, rank, relay, draft)
    return relay


def join_wave(
    config: NetloaderConfig,
    rank: int,
    relay: Server,
    *,
    fanout: int | None = 1,
    draft: bool = False,
) -> tuple[int, list[Endpoint]]:
    """Join WAVE_DIR's wave for `rank` as the member that `relay` serves. Returns its
    position and its sources, in order: the member before it (its parent in a tree of
    `fanout`; 1: a chain, None: everyone pulls from the seeds), that member's predecessors
    (fallbacks), the wave's seeds, then SOURCE's entries for `rank`."""
    if config.wave_dir is None:
        raise UsageError("join_wave needs WAVE_DIR")
    wave = _wave(config, rank, fanout, draft)
    position = wave.join(str(relay.address))
    relay.at_close(lambda: wave.release(position))  # a closed member is no upstream
    found: list[Endpoint] = []
    for text in wave.sources(position):
        try:
            found.append(parse_endpoint(text))
        except ValueError as exc:  # a stray or broken file: not a source, not a failure
            log.warning("netloader: wave %s: ignoring %r: %s", config.wave_dir, text, exc)
    return position, [*found, *config.sources_for(rank, draft=draft)]


def join_registry_wave(
    config: NetloaderConfig,
    rank: int,
    relay: Server,
    identity: Identity,
    *,
    fanout: int | None = 1,
    draft: bool = False,
) -> tuple[int | None, list[Endpoint]]:
    """Join REGISTRY's wave of `identity` for `rank` as the member that `relay` serves: its
    position claimed atomically, its record kept alive until `relay` closes. Returns the
    position and the sources, in order: its live upstream members (parent first, in a
    tree of `fanout`; 1: a chain, None: none; dead members have no record and are skipped
    without a connect attempt), the registry's live servers (least loaded first), then
    SOURCE's entries. A registry that cannot be reached within the connect timeout is one
    log line: position None, and SOURCE's entries alone."""
    configured = list(config.sources_for(rank, draft=draft))
    if config.registry is None:
        raise UsageError("join_registry_wave needs REGISTRY")
    try:
        registry = reg.Registry(config.registry, timeout=config.connect_timeout)
    except ImportError as exc:
        log.warning("netloader: cannot use REGISTRY (%s); using SOURCE", exc)
        return None, configured
    try:
        record, found = registry.join(_group(identity, rank), str(relay.address), fanout)
    except reg.RegistryError as exc:
        log.warning("netloader: %s; not joining its wave, using SOURCE only", exc)
        registry.close()
        return None, configured
    relay.at_close(reg.Heartbeat(registry, record).close)
    return record.position, list(dict.fromkeys([*_endpoints(found), *configured]))


def leave_wave(config: NetloaderConfig, rank: int, position: int, *, draft: bool = False) -> None:
    """Remove this member's record from WAVE_DIR's wave (its pull failed, or it stopped
    serving), so that later members do not pick it."""
    if config.wave_dir is not None:
        _wave(config, rank, None, draft).leave(position)


def _group(identity: Identity, rank: int) -> reg.Group:
    return reg.Group(identity.model, identity.tp_size, identity.pp_size, rank)


def _endpoints(addresses: Sequence[str]) -> list[Endpoint]:
    """The parseable ones (records are validated when read; this is the last guard)."""
    found = []
    for text in addresses:
        try:
            found.append(parse_endpoint(text))
        except ValueError:
            continue
    return found


def _serving(server: Server) -> bool:
    """Whether `server` serves now: its manifest (digests) is ready."""
    try:
        server.manifest(timeout=0)
    except NetloaderError:
        return False
    return True


def _wave(config: NetloaderConfig, rank: int, fanout: int | None, draft: bool) -> Wave:
    assert config.wave_dir is not None
    kind = DRAFT_SUFFIX if draft else ""
    return Wave(Path(config.wave_dir), rank=rank, fanout=fanout, kind=kind)


def load_rank(
    model: Tensors,
    identity: Identity,
    config: NetloaderConfig,
    rank: int,
    *,
    secret: bytes | None = None,
    sources: Sequence[Endpoint] | None = None,
    relay: Relay | None = None,
    draft: bool = False,
) -> LoadReport:
    """Load from REGISTRY's live servers and SOURCE's entries for `rank` (`find_sources`;
    from all at once), or from `sources`, one at a time in order (e.g. a wave's from
    `join_wave`), relaying each chunk through `relay` (from `relay_rank`) when given.
    Raises SourceUnavailable when there are no sources (the caller's cue to use its
    default loader) and TransferError on failure."""
    in_order = sources is not None
    if sources is None:
        sources = find_sources(config, identity, rank, draft=draft)
    if not sources:
        where = " in SOURCE or REGISTRY" if config.registry else " in SOURCE"
        raise SourceUnavailable(f"no sources for rank {rank}" + ("" if in_order else where))
    client = client_for(config, sources, stripe=1 if in_order else None, secret=secret)
    return client.load_into(
        tensors_of(model), identity, observer=None if relay is None else relay.arrivals
    )


@dataclass
class SortedSources:
    """A rank's sources by what they serve (see `sort_sources`)."""

    peers: list[Endpoint] = field(default_factory=list)  # an engine's own layout
    checkpoints: list[tuple[Endpoint, Manifest]] = field(default_factory=list)
    unreachable: list[str] = field(default_factory=list)  # why each of the others failed


def sort_sources(
    config: NetloaderConfig, sources: Sequence[Endpoint], *, secret: bytes | None = None
) -> SortedSources:
    """Ask each source (all at once, each within the connect timeout) what it serves:
    checkpoint-format tensors (a served checkpoint directory, which any parallel layout
    can load through its engine's own weight loading), or an engine's parameters in one
    layout. A source that cannot be reached is left out, with its reason."""
    found = SortedSources()
    if not sources:
        return found

    def ask(source: Endpoint) -> Manifest | str:
        try:
            return client_for(config, [source], secret=secret).manifest()
        except NetloaderError as exc:
            return f"{source}: {exc}"

    with ThreadPoolExecutor(len(sources), thread_name_prefix="netloader-probe") as pool:
        for source, answer in zip(sources, pool.map(ask, sources), strict=True):
            if isinstance(answer, str):
                found.unreachable.append(answer)
            elif answer.identity.attributes.get("weights") == CHECKPOINT_WEIGHTS:
                found.checkpoints.append((source, answer))
            else:
                found.peers.append(source)
    return found


def client_for(
    config: NetloaderConfig,
    sources: Sequence[Endpoint],
    *,
    stripe: int | None = None,
    secret: bytes | None = None,
) -> Client:
    """A Client for `sources` with the configuration's secret, transport, timeouts and TLS."""
    return Client(
        sources,
        secret=resolve_secret(secret, config.secret_file),
        transport=config.transport,
        timeouts=config.timeouts,
        stripe=stripe,
        tls=config.client_tls(),
    )


def _server_options(config: NetloaderConfig, port: int, secret: bytes | None) -> ServerOptions:
    return {
        "listen": Endpoint(config.listen_host, port),
        "advertise_host": advertised_host(config.listen_host, config.advertise_host),
        "secret": resolve_secret(secret, config.secret_file),
        "timeouts": config.timeouts,
        "limits": config.limits,
        "tls": config.server_tls(),
    }


def _publish(config: NetloaderConfig, rank: int, server: Server, draft: bool) -> None:
    """OUTPUT_PREFIX's file for `rank`, once listening. A file that cannot be written is
    logged; the server serves anyway (peers may know its address otherwise)."""
    path = config.output_file_for(rank, draft=draft)
    if path is None:
        return
    try:
        write_address_file(path, server.address)
    except OSError as exc:
        log.error("netloader: cannot write OUTPUT_PREFIX file %s (serving anyway): %s", path, exc)
