"""The pulling side: `Client` (connections, handshake, workers; puller.py), the state its
workers share (shared.py), the pure striping `Scheduler`, the `VerifyingSink` that
accepts only chunks whose digest matches, and `stream_tensors`, which hands a
checkpoint's tensors to a consumer a window at a time."""

from netloader.client.puller import Client, LoadReport
from netloader.client.scheduler import Scheduler
from netloader.client.shared import PullObserver, SharedPull
from netloader.client.sink import VerifyingSink
from netloader.client.stream import stream_tensors

__all__ = [
    "Client",
    "LoadReport",
    "PullObserver",
    "Scheduler",
    "SharedPull",
    "VerifyingSink",
    "stream_tensors",
]
