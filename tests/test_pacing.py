"""A seed keeps serving: its sending threads run at a lower priority, and a send-rate cap
holds every transfer together to the rate, on either transport (real sockets)."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pytest

import netloader
from netloader import Client, Identity
from netloader.settings import Limits
from netloader.testing.models import differing, transformer_like
from support.tensors import empty_like_set

RATE = 10e6  # bytes per second, the lowest a server accepts


@pytest.mark.parametrize("transport", ["tcp", "same-host"])
def test_a_capped_server_sends_no_faster_than_its_rate(transport: str) -> None:
    expected = transformer_like()
    total = sum(t.nbytes for t in expected.values())
    limits = Limits(send_rate=RATE)
    with netloader.serve(expected, "m", limits=limits, chunk_bytes=256 << 10) as server:
        server.manifest()
        dest = empty_like_set(expected)
        started = time.monotonic()
        report = Client([str(server.address)], transport=transport).load_into(dest, Identity("m"))
        elapsed = time.monotonic() - started
    assert report.transport == transport
    assert not differing(dest, expected)
    # A lower bound only: the cap is a ceiling (the first 0.1 s worth may go at once).
    assert elapsed >= (total - 0.1 * RATE) / RATE


def test_the_server_sends_from_threads_of_lower_priority() -> None:
    expected = transformer_like()
    seen: dict[str, int] = {}
    with netloader.serve(expected, "m", limits=Limits(sender_nice=7)) as server:
        server.manifest()

        def look(_: int) -> None:
            for thread in threading.enumerate():
                if thread.name.startswith("netloader-") and thread.native_id is not None:
                    with contextlib.suppress(OSError):  # it may have ended meanwhile
                        seen[thread.name] = os.getpriority(os.PRIO_PROCESS, thread.native_id)

        own = str(server.address)
        dest = empty_like_set(expected)
        Client([own], transport="tcp").load_into(dest, Identity("m"), progress=look)
    conversations = {
        name: nice
        for name, nice in seen.items()
        if name != f"netloader-{own}" and not name.startswith("netloader-read")
    }
    assert conversations.pop("netloader-accept") == 7
    assert conversations and set(conversations.values()) == {7}, seen  # the sender's
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == 0  # ours untouched
