"""Prometheus metrics (`prometheus-client`). Counting is always on and costs an increment
per chunk; exposing them is off by default, on with `--metrics HOST:PORT` or METRICS_PORT
(`serve_metrics`). They live in a registry of their own, so that a host process with its
own metrics (vLLM's API server) never sees ours mixed in, nor clashes with them. Names
follow Prometheus conventions: the `netloader_` prefix, base units, `_total` counters."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from netloader.endpoint import Endpoint
from netloader.errors import (
    AuthenticationError,
    IntegrityError,
    ManifestMismatch,
    ServerBusy,
    SourceUnavailable,
    TransferTimeout,
    VersionMismatch,
)

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)
_SECONDS = (0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

SENT_BYTES = Counter("netloader_sent_bytes", "Tensor bytes sent to clients.", registry=REGISTRY)
RECEIVED_BYTES = Counter(
    "netloader_received_bytes", "Tensor bytes received and verified.", registry=REGISTRY
)
TRANSFERS_STARTED = Counter(
    "netloader_transfers_started",
    "Transfers begun: a client's pull (side=client) or a FETCH served (side=server).",
    ["side"],
    registry=REGISTRY,
)
TRANSFERS_FINISHED = Counter(
    "netloader_transfers_finished",
    "Transfers ended, by outcome (ok, or the kind of failure).",
    ["side", "outcome"],
    registry=REGISTRY,
)
TRANSFER_SECONDS = Histogram(
    "netloader_transfer_duration_seconds",
    "Duration of transfers that ended, whatever their outcome.",
    ["side"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
CONNECTIONS_OPEN = Gauge(
    "netloader_connections_open", "Client connections a server holds now.", registry=REGISTRY
)
REFUSALS = Counter(
    "netloader_refusals",
    "Refusals, by reason (busy, auth, mismatch, version): a server's of its clients, and a "
    "client's of its sources.",
    ["reason"],
    registry=REGISTRY,
)
INTEGRITY_FAILURES = Counter(
    "netloader_integrity_failures",
    "Chunks whose digest did not match the manifest (bytes rejected).",
    registry=REGISTRY,
)
VLLM_LOADS = Counter(
    "netloader_vllm_loads",
    "Models a vLLM worker loaded, by path (peer, checkpoint, disk) and, for disk, the "
    "reason netloader did not load them (a bounded set of kinds).",
    ["path", "reason"],
    registry=REGISTRY,
)
VLLM_LOAD_PHASE_SECONDS = Histogram(
    "netloader_vllm_load_phase_duration_seconds",
    "Duration of a vLLM worker's load phases (pull, disk, serve).",
    ["phase"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
MODEL_VERSION = Gauge(
    "netloader_model_version",
    "The version of a model's weights this process holds (versions that are integers).",
    ["model"],
    registry=REGISTRY,
)
UPDATES_FINISHED = Counter(
    "netloader_updates_finished",
    "Live updates ended, by outcome (ok, or the kind of failure: the old version stays).",
    ["outcome"],
    registry=REGISTRY,
)
UPDATE_PHASE_SECONDS = Histogram(
    "netloader_update_phase_duration_seconds",
    "Duration of live-update phases: stage (pull and verify), switch (copy into the model).",
    ["phase"],
    buckets=_SECONDS,
    registry=REGISTRY,
)


def holds_version(model: str, version: str) -> None:
    """Record the version of `model` this process now holds (integers only: a gauge)."""
    if version.isdigit():
        MODEL_VERSION.labels(model).set(int(version))


# Failure kinds as labels: a bounded set, whatever the message said.
_KINDS: tuple[tuple[type[BaseException], str], ...] = (
    (ServerBusy, "busy"),
    (AuthenticationError, "auth"),
    (ManifestMismatch, "mismatch"),
    (VersionMismatch, "version"),
    (IntegrityError, "integrity"),
    (TransferTimeout, "timeout"),
    (SourceUnavailable, "unavailable"),
)


REFUSAL_KINDS = frozenset({"busy", "auth", "mismatch", "version"})


def kind(exc: BaseException | None) -> str:
    """A failure's kind, as a label value: one of a fixed few."""
    if exc is None:
        return "ok"
    return next((name for cls, name in _KINDS if isinstance(exc, cls)), "error")


_serving: dict[tuple[str, int], object] = {}
_lock = threading.Lock()


def serve_metrics(endpoint: Endpoint) -> None:
    """Expose the metrics at http://HOST:PORT/metrics from a background thread (once per
    address in a process; a second call for the same one does nothing)."""
    key = (endpoint.host, endpoint.port)
    with _lock:
        if key in _serving:
            return
        _serving[key] = start_http_server(endpoint.port, endpoint.host, registry=REGISTRY)
    log.info("netloader: metrics on http://%s/metrics", endpoint)
