"""The serving side: `Server` (listener, caps, a thread per connection), `Relay` (a server
for a model still arriving), the per-connection `Conversation`, and what they serve
(`Holdings`: `LoadedTensors`, `PartOfModel` or `Arrivals`)."""

from netloader.server.holdings import Arrivals, Holdings, LoadedTensors, PartOfModel
from netloader.server.server import Relay, Server, ServerOptions

__all__ = [
    "Arrivals",
    "Holdings",
    "LoadedTensors",
    "PartOfModel",
    "Relay",
    "Server",
    "ServerOptions",
]
