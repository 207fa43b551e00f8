"""The pulling side: `Client` (connections, handshake, workers; puller.py), the state its
workers share (shared.py), the pure striping `Scheduler` and the `VerifyingSink` that
accepts only chunks whose digest matches."""

from netloader.client.puller import Client, LoadReport
from netloader.client.scheduler import Scheduler
from netloader.client.shared import PullObserver, SharedPull
from netloader.client.sink import VerifyingSink

__all__ = ["Client", "LoadReport", "PullObserver", "Scheduler", "SharedPull", "VerifyingSink"]
