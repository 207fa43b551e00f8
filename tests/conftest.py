"""Fixtures that start real netloader server processes, fault-injecting proxies and
scripted fake servers; each is a factory typed in support.servers, and everything it
made is stopped when the test ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from support.servers import (
    FakeServer,
    FakeServers,
    MakeProxy,
    Proxies,
    Servers,
    StartCliServer,
    StartServer,
)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    started = Servers(tmp_path)
    yield started
    started.close()


@pytest.fixture
def start_server(servers: Servers) -> StartServer:
    """start_server("transformer_like", "--model", "m") -> a running peer process."""
    return servers.peer


@pytest.fixture
def cli_server(servers: Servers) -> StartCliServer:
    """cli_server(model_dir, "--model", "m") -> a running `netloader serve` process."""
    return servers.cli


@pytest.fixture
def proxy() -> Iterator[MakeProxy]:
    """proxy(address, rate=..., flip_at=..., ...) -> a FaultyProxy in front of address."""
    proxies = Proxies()
    yield proxies
    proxies.close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    fakes = FakeServers()
    yield fakes
    fakes.close()
