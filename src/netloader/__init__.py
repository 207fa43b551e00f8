"""netloader: model weights from peers that already hold them, verified, at network speed.

server = netloader.serve(model, "my-model")                 # background threads
report = netloader.load(empty_model, [server.address], "my-model")
"""

from netloader.api import load, publish, relay, serve, tensors_of, update
from netloader.checkpoint import checkpoint_identity
from netloader.client import Client, LoadReport
from netloader.client.update import StagedUpdate, UpdateReport, stage_update
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint
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
from netloader.manifest import Identity, Manifest
from netloader.ranks import join_wave, load_rank, relay_rank, serve_rank
from netloader.server import Relay, Server
from netloader.settings import Limits, Timeouts

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
