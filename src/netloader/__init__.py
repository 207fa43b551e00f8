"""netloader: model weights from peers that already hold them, verified, at network speed.

server = netloader.serve(model, "my-model")                 # background threads
report = netloader.load(empty_model, [server.address], "my-model")

The names below are imported on first use, so that what needs no tensors (the `netloader
update` and `peers` commands, the registry, the error types) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from netloader.errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    ManifestMismatch,
    NetloaderError,
    PeerClosed,
    ProtocolError,
    RemoteError,
    ServerBusy,
    SourceUnavailable,
    TransferError,
    TransferTimeout,
    UsageError,
    VersionMismatch,
)
from netloader.settings import Limits, Timeouts

if TYPE_CHECKING:
    from netloader.api import load, publish, relay, serve, tensors_of, update
    from netloader.checkpoint import checkpoint_identity
    from netloader.client import Client, LoadReport
    from netloader.client.update import StagedUpdate, UpdateReport, stage_update
    from netloader.config import NetloaderConfig
    from netloader.endpoint import Endpoint
    from netloader.manifest import Identity, Manifest
    from netloader.ranks import join_wave, load_rank, relay_rank, serve_rank
    from netloader.server import Relay, Server

# name -> the module it comes from, imported when the name is first used
_LAZY = {
    **dict.fromkeys(("load", "publish", "relay", "serve", "tensors_of", "update"), "api"),
    "checkpoint_identity": "checkpoint",
    **dict.fromkeys(("Client", "LoadReport"), "client"),
    **dict.fromkeys(("StagedUpdate", "UpdateReport", "stage_update"), "client.update"),
    "NetloaderConfig": "config",
    "Endpoint": "endpoint",
    **dict.fromkeys(("Identity", "Manifest"), "manifest"),
    **dict.fromkeys(("join_wave", "load_rank", "relay_rank", "serve_rank"), "ranks"),
    **dict.fromkeys(("Relay", "Server"), "server"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'netloader' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"netloader.{module}"), name)
    globals()[name] = value  # once: later uses are plain lookups
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AuthenticationError",
    "Client",
    "ConfigError",
    "Endpoint",
    "Identity",
    "IntegrityError",
    "Limits",
    "LoadReport",
    "Manifest",
    "ManifestMismatch",
    "NetloaderConfig",
    "NetloaderError",
    "PeerClosed",
    "ProtocolError",
    "Relay",
    "RemoteError",
    "Server",
    "ServerBusy",
    "SourceUnavailable",
    "StagedUpdate",
    "Timeouts",
    "TransferError",
    "TransferTimeout",
    "UpdateReport",
    "UsageError",
    "VersionMismatch",
    "checkpoint_identity",
    "join_wave",
    "load",
    "load_rank",
    "publish",
    "relay",
    "relay_rank",
    "serve",
    "serve_rank",
    "stage_update",
    "tensors_of",
    "update",
]
