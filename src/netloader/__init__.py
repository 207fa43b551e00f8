"""netloader: model weights from peers that already hold them, verified, at network speed."""

from netloader.api import (
    join_wave,
    load,
    load_rank,
    relay,
    relay_rank,
    resolve_secret,
    serve,
    serve_rank,
    tensors_of,
)
from netloader.client import Client, LoadReport
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import (
    AuthenticationError,
    ConfigError,
    IntegrityError,
    ManifestMismatch,
    NetloaderError,
    PeerClosed,
    ProtocolError,
    SourceUnavailable,
    TransferError,
    TransferTimeout,
    VersionMismatch,
)
from netloader.holdings import Arrivals, LoadedTensors
from netloader.manifest import Identity, Manifest
from netloader.server import Server

__all__ = [
    "Arrivals",
    "AuthenticationError",
    "Client",
    "ConfigError",
    "Endpoint",
    "Identity",
    "IntegrityError",
    "LoadReport",
    "LoadedTensors",
    "Manifest",
    "ManifestMismatch",
    "NetloaderConfig",
    "NetloaderError",
    "PeerClosed",
    "ProtocolError",
    "Server",
    "SourceUnavailable",
    "TransferError",
    "TransferTimeout",
    "VersionMismatch",
    "join_wave",
    "load",
    "load_rank",
    "parse_endpoint",
    "relay",
    "relay_rank",
    "resolve_secret",
    "serve",
    "serve_rank",
    "tensors_of",
]
