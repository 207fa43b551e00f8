"""The pulling side: `Client` (connections, handshake, workers), the pure striping
`Scheduler`, and the `VerifyingSink` that accepts only chunks whose digest matches."""

from netloader.client.puller import Client, LoadReport, PullObserver
from netloader.client.scheduler import Scheduler
from netloader.client.sink import VerifyingSink

__all__ = ["Client", "LoadReport", "PullObserver", "Scheduler", "VerifyingSink"]
