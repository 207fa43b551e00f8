"""The Python API for any PyTorch model: serve a module or a dict of tensors, and load
into one from peers.

    >>> server = netloader.serve(model, model_name="my-model")          # background threads
    >>> report = netloader.load(empty_model, [server.address], model_name="my-model")
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from netloader.client import Client, LoadReport
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import SourceUnavailable
from netloader.holdings import Arrivals, LoadedTensors
from netloader.manifest import DEFAULT_CHUNK_BYTES, Identity, Manifest
from netloader.server import Server

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
    if relay is not None and not isinstance(relay.holdings, Arrivals):
        raise ValueError("relay= takes the Server returned by netloader.relay()")
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
    arrivals = None if relay is None else relay.holdings
    assert arrivals is None or isinstance(arrivals, Arrivals)
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
    port = config.listen_port_for(rank)
    if port is None:
        return None
    return Server(
        LoadedTensors(tensors_of(model), identity, manifest=manifest, unavailable=unavailable),
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
) -> LoadReport:
    """Load from the sources SOURCE lists for `rank`. Raises SourceUnavailable when there
    are none (the caller's cue to use its default loader) and TransferError on failure."""
    sources = config.sources_for(rank)
    if not sources:
        raise SourceUnavailable(f"SOURCE lists no sources for rank {rank}")
    client = Client(
        sources,
        secret=resolve_secret(secret, config.secret_file),
        transport=config.transport,
        connect_timeout=config.connect_timeout,
        stall_timeout=config.stall_timeout,
        tls=config.client_tls(),
    )
    return client.load_into(tensors_of(model), identity)
