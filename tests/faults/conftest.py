"""The fault tests, grouped by who misbehaves: the server dies (test_server_dies), its
bytes arrive wrong (test_server_corrupts), a client misbehaves (test_client_misbehaves),
a hostile peer sends malformed data (test_hostile_input), too many clients at once
(test_overload). In every case the side that behaves fails clearly, in bounded time,
never accepts a wrong byte, and a server goes on serving legitimate clients."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from netloader import Server
from support.limited import limited_server


@pytest.fixture
def served() -> Iterator[Server]:
    """An in-process server with tight limits (support.limited.limited_server)."""
    with limited_server() as server:
        yield server
