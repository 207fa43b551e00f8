"""The Python API for any PyTorch model: serve a module or a dict of tensors, load into
one from peers, and update a live one to a new version in place.

    >>> server = netloader.serve(model, "my-model")                       # background threads
    >>> report = netloader.load(empty_model, [server.address], "my-model")
    >>> publisher = netloader.publish(new_state_dict, "my-model", version=2)
    >>> report = netloader.update(model, [publisher.address], "my-model", version=2)
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from netloader.client import Client, LoadReport
from netloader.client.update import UpdateReport, stage_update
from netloader.endpoint import Endpoint, advertised_host, parse_endpoint, write_address_file
from netloader.errors import UsageError
from netloader.manifest import DEFAULT_CHUNK_BYTES, Identity
from netloader.server import LoadedTensors, Relay, Server
from netloader.settings import DEFAULT_LIMITS, DEFAULT_TIMEOUTS, Limits, Timeouts, resolve_secret

Tensors = Mapping[str, torch.Tensor] | torch.nn.Module


def tensors_of(model: Tensors) -> dict[str, torch.Tensor]:
    """Name -> tensor for a module (parameters and persistent buffers, sharing memory
    with the module) or a mapping."""
    if isinstance(model, torch.nn.Module):
        return {name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}
    return dict(model)


def as_identity(identity: Identity | str) -> Identity:
    """An Identity, or a model name for a model with no parallel layout (tp = pp = 1)."""
    return Identity(identity) if isinstance(identity, str) else identity


def serve(
    model: Tensors,
    identity: Identity | str,
    *,
    listen: str | Endpoint = "127.0.0.1:0",
    advertise_host: str | None = None,
    secret: bytes | str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    column_tiles: int = 1,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    limits: Limits = DEFAULT_LIMITS,
    tls: ssl.SSLContext | None = None,
    output_file: str | Path | None = None,
    version: int | str | None = None,
) -> Server:
    """Serve `model`'s tensors from background threads, by reference (no copy); returns the
    running Server (`.address`, `.close()`, a context manager).

    model:          a torch module or a mapping of name -> tensor.
    identity:       the model name, or an Identity (name, tp/pp layout, attributes) that
                    clients must match.
    listen:         "host:port" to bind; port 0 picks a free port. Loopback by default:
                    exposing weights to a network is a decision to make explicitly.
    advertise_host: the host to publish when binding a wildcard (default: this host's).
    secret:         require clients to prove they know it (default: $NETLOADER_SECRET).
    chunk_bytes:    unit of transfer and of verification.
    column_tiles:   cut each matrix larger than a chunk into this many column tiles, so a
                    client can pull (and verify) some columns of it: the shard of a
                    row-parallel layer; 1: rows only.
    timeouts:       handshake (a new connection's) and stall (silence afterwards).
    limits:         connection and transfer caps, send-rate cap, sender priority.
    tls:            netloader.transports.tls.server_context(cert, key) to require TLS.
    output_file:    write "host:port" there (atomically) once listening.
    version:        the version of the weights (in the identity; see `publish`).
    """
    endpoint = _listen_endpoint(listen)
    server = Server(
        LoadedTensors(
            tensors_of(model),
            versioned(as_identity(identity), version),
            chunk_bytes=chunk_bytes,
            column_tiles=column_tiles,
        ),
        listen=endpoint,
        advertise_host=advertised_host(endpoint.host, advertise_host),
        secret=resolve_secret(secret),
        timeouts=timeouts,
        limits=limits,
        tls=tls,
    )
    return _published(server, output_file)


def versioned(identity: Identity, version: int | str | None) -> Identity:
    """`identity` as version `version` (unchanged for None)."""
    return identity if version is None else replace(identity, version=str(version))


def publish(
    model: Tensors, identity: Identity | str, *, version: int | str, **options: Any
) -> Server:
    """Serve `model` (a trainer's new weights, any dict of tensors) as version `version` of
    `identity`, for running instances to `update` to; `options` as for `serve`. Instances
    pull only the chunks that differ from what they hold."""
    return serve(model, identity, version=version, **options)


def update(
    model: Tensors,
    sources: Sequence[str | Endpoint],
    identity: Identity | str,
    *,
    version: int | str | None = None,
    paused: Callable[[], AbstractContextManager[Any]] | None = None,
    server: Server | None = None,
    keep_previous: bool = True,
    max_staging_bytes: int | None = None,
    secret: bytes | str | None = None,
    transport: str = "auto",
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    tls: ssl.SSLContext | None = None,
) -> UpdateReport:
    """Switch `model`, in place, to the version of its weights that `sources` serve, all or
    nothing: the chunks that differ from what it holds are pulled into staging memory and
    verified first, then copied into its tensors inside `paused()`. On any failure before
    that the model is left exactly as it was.

    model:     the live module or mapping of tensors (contiguous; host or device).
    sources:   "host:port" of servers of the new version (a publisher, or instances that
               already updated).
    identity:  the model name, or an Identity, that the servers' must match.
    version:   take only this version (default: whatever the sources serve).
    paused:    a context manager factory that keeps the model's readers out while the new
               bytes are copied in (e.g. an engine's pause and resume); none by default.
    server:    a Server serving `model`: it serves the new version once switched, and
               (`keep_previous`) goes on serving the version it served to clients that
               ask for it (the tensors the switch changes are copied first).
    max_staging_bytes: cap on the staging memory (the changed tensors, whole).
    secret, transport, timeouts, tls: as for `load`.

    Raises ManifestMismatch, UsageError or a TransferError (the model unchanged); returns
    the report (chunks and bytes that moved, seconds to stage and to switch).
    """
    client = Client(
        sources, secret=resolve_secret(secret), transport=transport, timeouts=timeouts, tls=tls
    )
    staged = stage_update(
        client,
        tensors_of(model),
        versioned(as_identity(identity), version),
        max_staging_bytes=max_staging_bytes,
    )
    with paused() if paused is not None else contextlib.nullcontext():
        return staged.commit(server, keep_previous=keep_previous)


def load(
    model: Tensors,
    sources: Sequence[str | Endpoint],
    identity: Identity | str,
    *,
    secret: bytes | str | None = None,
    transport: str = "auto",
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    stripe: int | None = None,
    relay: Relay | None = None,
    tls: ssl.SSLContext | None = None,
) -> LoadReport:
    """Fill `model`'s tensors in place from `sources`, every chunk verified.

    model:     the module (built with empty weights) or mapping of tensors to fill.
    sources:   "host:port" of servers, pulled from all at once (disjoint parts from each,
               balanced by their speed; a failed one leaves its rest to the others).
    identity:  the model name, or an Identity, that the servers' must match.
    secret:    the shared secret (default: $NETLOADER_SECRET).
    transport: a name from netloader.transports.names(); "auto" is the default.
    timeouts:  connect (connect and handshake) and stall (silence while pulling).
    stripe:    pull from this many sources at once (1: one at a time, in order).
    relay:     a Relay from `netloader.relay()`: each chunk is served on from there as
               soon as it has arrived verified.
    tls:       netloader.transports.tls.client_context(ca) to require TLS.

    Raises a netloader.TransferError on failure; its `.completed` names the tensors that
    arrived, so a fallback loader needs to load only the others.
    """
    client = Client(
        sources,
        secret=resolve_secret(secret),
        transport=transport,
        timeouts=timeouts,
        stripe=stripe,
        tls=tls,
    )
    return client.load_into(
        tensors_of(model),
        as_identity(identity),
        observer=None if relay is None else relay.arrivals,
    )


def relay(
    *,
    listen: str | Endpoint = "127.0.0.1:0",
    advertise_host: str | None = None,
    secret: bytes | str | None = None,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    limits: Limits = DEFAULT_LIMITS,
    tls: ssl.SSLContext | None = None,
    output_file: str | Path | None = None,
) -> Relay:
    """A Relay for a model about to be loaded: listening now (so its address can be handed
    to the next instances), serving each chunk once `load(..., relay=it)` has received
    and verified it, and the whole model after `relay.finish(tensors, identity)`.
    Arguments as for `serve`."""
    endpoint = _listen_endpoint(listen)
    server = Relay(
        listen=endpoint,
        advertise_host=advertised_host(endpoint.host, advertise_host),
        secret=resolve_secret(secret),
        timeouts=timeouts,
        limits=limits,
        tls=tls,
    )
    return _published(server, output_file)


S = TypeVar("S", bound=Server)


def _published(server: S, output_file: str | Path | None) -> S:
    if output_file is not None:
        write_address_file(Path(output_file), server.address)
    return server


def _listen_endpoint(listen: str | Endpoint) -> Endpoint:
    if isinstance(listen, Endpoint):
        return listen
    try:
        return parse_endpoint(listen, allow_zero=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
