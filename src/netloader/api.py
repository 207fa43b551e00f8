"""The Python API for any PyTorch model: serve a module or a dict of tensors, and load
into one from peers.

    >>> server = netloader.serve(model, model_name="my-model")          # background threads
    >>> report = netloader.load(empty_model, [server.address], model_name="my-model")
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from netloader.client import Client, LoadReport
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import SourceUnavailable
from netloader.holdings import Arrivals, Holdings, LoadedTensors
from netloader.manifest import DEFAULT_CHUNK_BYTES, Identity, Manifest
from netloader.server import Server
from netloader.wave import Wave

log = logging.getLogger(__name__)

SECRET_ENV = "NETLOADER_SECRET"
MAX_SECRET_BYTES = 4096
Tensors = Mapping[str, torch.Tensor] | torch.nn.Module


def tensors_of(model: Tensors) -> dict[str, torch.Tensor]:
    """Name -> tensor for a module (parameters and persistent buffers, sharing memory
    with the module) or a mapping."""
    if isinstance(model, torch.nn.Module):
        return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
    return dict(model)


def resolve_secret(
    secret: bytes | str | None = None, secret_file: str | Path | None = None
) -> bytes | None:
    """The shared secret: given directly, read from a file, or from $NETLOADER_SECRET."""
    if secret is not None:
        value = secret.encode() if isinstance(secret, str) else secret
    elif secret_file is not None:
        with open(secret_file, "rb") as f:
            value = f.read(MAX_SECRET_BYTES + 1).strip()
        if len(value) > MAX_SECRET_BYTES:
            raise ValueError(f"secret file {secret_file} is over {MAX_SECRET_BYTES} bytes")
    elif os.environ.get(SECRET_ENV):
        value = os.environ[SECRET_ENV].encode()
    else:
        return None
    if not value:
        raise ValueError("the netloader secret is empty")
    return value


def serve(
    model: Tensors,
    *,
    model_name: str,
    listen: str | Endpoint = "127.0.0.1:0",
    secret: bytes | str | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    pp_size: int = 1,
    pp_rank: int = 0,
    attributes: Mapping[str, str] | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    advertise_host: str | None = None,
    output_file: str | Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> Server:
    """Serve `model`'s tensors from background threads; returns the running Server
    (`.address`, `.close()`). The tensors are served by reference, not copied.
    `tls`: netloader.tls.server_context(cert, key) to require TLS."""
    identity = Identity(model_name, tp_size, tp_rank, pp_size, pp_rank, dict(attributes or {}))
    return Server(
        LoadedTensors(tensors_of(model), identity, chunk_bytes=chunk_bytes),
        listen=listen if isinstance(listen, Endpoint) else parse_endpoint(listen, allow_zero=True),
        advertise_host=advertise_host,
        secret=resolve_secret(secret),
        output_file=None if output_file is None else Path(output_file),
        tls=tls,
    )


def load(
    model: Tensors,
    sources: Sequence[str | Endpoint],
    *,
    model_name: str,
    secret: bytes | str | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    pp_size: int = 1,
    pp_rank: int = 0,
    attributes: Mapping[str, str] | None = None,
    transport: str = "auto",
    connect_timeout: float = 5.0,
    stall_timeout: float = 10.0,
    stripe: int | None = None,
    relay: Server | None = None,
    tls: ssl.SSLContext | None = None,
) -> LoadReport:
    """Fill `model`'s tensors in place from `sources`, verified: from all of them at once
    (or `stripe` at a time, the rest as fallbacks). With `relay` (from `netloader.relay()`),
    each chunk is served on to others as soon as it has arrived verified.

    Raises a netloader.TransferError on failure; its `.completed` names the tensors that
    arrived, so a fallback loader needs to load only the others.
    """
    arrivals = _arrivals_of(relay)
    identity = Identity(model_name, tp_size, tp_rank, pp_size, pp_rank, dict(attributes or {}))
    client = Client(
        sources,
        secret=resolve_secret(secret),
        transport=transport,
        connect_timeout=connect_timeout,
        stall_timeout=stall_timeout,
        stripe=stripe,
        tls=tls,
    )
    return client.load_into(tensors_of(model), identity, arrivals=arrivals)


def relay(
    *,
    listen: str | Endpoint = "127.0.0.1:0",
    secret: bytes | str | None = None,
    advertise_host: str | None = None,
    stall_timeout: float = 10.0,
    output_file: str | Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> Server:
    """A server for a model that is about to be loaded: listening now (so its address can
    be handed to the next instances), serving each chunk once `load(..., relay=server)`
    has received and verified it, and the whole model afterwards."""
    return Server(
        Arrivals(),
        listen=listen if isinstance(listen, Endpoint) else parse_endpoint(listen, allow_zero=True),
        advertise_host=advertise_host,
        secret=resolve_secret(secret),
        stall_timeout=stall_timeout,
        output_file=None if output_file is None else Path(output_file),
        tls=tls,
    )


# ---- the same, driven by the seed configuration, per parallel rank -----------------------


def serve_rank(
    model: Tensors,
    identity: Identity,
    config: NetloaderConfig,
    rank: int,
    *,
    secret: bytes | None = None,
    manifest: Manifest | None = None,
    unavailable: str | None = None,
) -> Server | None:
    """Serve on LISTEN_PORT + rank (a free port when unset) and write OUTPUT_PREFIX's file.
    Returns None when that port is outside 1024-65535 (logged): this rank does not serve."""
    holdings = LoadedTensors(
        tensors_of(model), identity, manifest=manifest, unavailable=unavailable
    )
    return _rank_server(holdings, config, rank, secret)


def relay_rank(config: NetloaderConfig, rank: int, *, secret: bytes | None = None) -> Server | None:
    """Like `serve_rank`, but for a model about to be loaded: listening now, serving each
    chunk once `load_rank(..., relay=server)` has it verified. Once the model is loaded (or
    loaded otherwise), `server.serve_instead(LoadedTensors(...))` serves it from there on."""
    return _rank_server(Arrivals(), config, rank, secret)


def join_wave(config: NetloaderConfig, rank: int, relay: Server) -> tuple[int, list[Endpoint]]:
    """Join WAVE_DIR's wave for `rank` as the member that `relay` serves. Returns its
    position and its sources, in order: the member before it, that member's predecessors
    (fallbacks), the wave's seeds, then SOURCE's entries for `rank`."""
    if config.wave_dir is None:
        raise ValueError("join_wave needs WAVE_DIR")
    wave = Wave(Path(config.wave_dir), rank=rank)
    position = wave.join(str(relay.address))
    found: list[Endpoint] = []
    for text in wave.sources(position):
        try:
            found.append(parse_endpoint(text))
        except ValueError as exc:  # a stray or broken file: not a source, not a failure
            log.warning("netloader: wave %s: ignoring %r: %s", config.wave_dir, text, exc)
    return position, [*found, *config.sources_for(rank)]


def _rank_server(
    holdings: Holdings, config: NetloaderConfig, rank: int, secret: bytes | None
) -> Server | None:
    port = config.listen_port_for(rank)
    if port is None:
        return None
    return Server(
        holdings,
        listen=Endpoint(config.listen_host, port),
        advertise_host=config.advertise_host,
        secret=resolve_secret(secret, config.secret_file),
        stall_timeout=config.stall_timeout,
        output_file=config.output_file_for(rank),
        tls=config.server_tls(),
    )


def load_rank(
    model: Tensors,
    identity: Identity,
    config: NetloaderConfig,
    rank: int,
    *,
    secret: bytes | None = None,
    sources: Sequence[Endpoint] | None = None,
    relay: Server | None = None,
) -> LoadReport:
    """Load from the sources SOURCE lists for `rank` (or from `sources`, one at a time in
    order, e.g. a wave's from `join_wave`), relaying each chunk through `relay` (from
    `relay_rank`) when given. Raises SourceUnavailable when there are no sources (the
    caller's cue to use its default loader) and TransferError on failure."""
    in_order = sources is not None
    sources = config.sources_for(rank) if sources is None else tuple(sources)
    if not sources:
        raise SourceUnavailable(f"no sources for rank {rank}" + ("" if in_order else " in SOURCE"))
    client = Client(
        sources,
        secret=resolve_secret(secret, config.secret_file),
        transport=config.transport,
        connect_timeout=config.connect_timeout,
        stall_timeout=config.stall_timeout,
        stripe=1 if in_order else None,
        tls=config.client_tls(),
    )
    return client.load_into(tensors_of(model), identity, arrivals=_arrivals_of(relay))


def _arrivals_of(relay: Server | None) -> Arrivals | None:
    if relay is None:
        return None
    if not isinstance(relay.holdings, Arrivals):
        raise ValueError("relay= takes a Server from netloader.relay() or relay_rank()")
    return relay.holdings
