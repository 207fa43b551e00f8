"""Signed update requests (`netloader.signing`) and the update route's request checks
(`integrations.vllm_routes`), without vLLM: pure functions."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import pytest

from netloader.cli.update import PLUGIN_PATH
from netloader.integrations import vllm_routes
from netloader.signing import SIGNATURE_HEADER, TIME_HEADER, SignedRequests, sign

SECRET = b"a long enough secret, 16+ bytes"
BODY = b'{"version": "2", "sources": ["127.0.0.1:1"]}'
NOW = 1_800_000_000.0
HOST = "10.0.0.7:8000"


def test_a_signed_request_is_taken_once() -> None:
    receiver = SignedRequests(SECRET)
    headers = sign(SECRET, "POST", HOST, PLUGIN_PATH, BODY, now=NOW)
    assert receiver.refusal("POST", HOST.upper(), PLUGIN_PATH, BODY, headers, now=NOW + 1) is None
    again = receiver.refusal("POST", HOST, PLUGIN_PATH, BODY, headers, now=NOW + 2)
    assert again is not None and "replay" in again


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": b"another secret, just as long!!"}, "another secret"),
        ({"host": "10.0.0.8:8000"}, "another host"),  # another instance of the fleet
        ({"body": BODY.replace(b"2", b"3")}, "does not match"),
        ({"path": "/netloader/other"}, "does not match"),
        ({"method": "PUT"}, "does not match"),
        ({"now": NOW - 120}, "away from this clock"),
        ({"now": NOW + 120}, "away from this clock"),
    ],
)
def test_what_a_signature_covers(change: dict[str, object], reason: str) -> None:
    signed = {"secret": SECRET, "method": "POST", "host": HOST, "path": PLUGIN_PATH, "body": BODY}
    headers = sign(**{"now": NOW, **signed, **change})  # type: ignore[arg-type]
    refusal = SignedRequests(SECRET).refusal("POST", HOST, PLUGIN_PATH, BODY, headers, now=NOW)
    assert refusal is not None and reason in refusal


def test_unsigned_malformed_and_secretless() -> None:
    def refusal(headers: dict[str, str], secret: bytes | None = SECRET) -> str:
        return str(SignedRequests(secret).refusal("POST", HOST, PLUGIN_PATH, BODY, headers))

    assert "not signed" in refusal({})
    assert "not a time" in refusal({TIME_HEADER: "yesterday", SIGNATURE_HEADER: "00"})
    assert "away from" in refusal({TIME_HEADER: "nan", SIGNATURE_HEADER: "00"})
    now = sign(SECRET, "POST", HOST, PLUGIN_PATH, BODY)[TIME_HEADER]
    assert "does not match" in refusal({TIME_HEADER: now, SIGNATURE_HEADER: "\u00e9\u2603"})
    assert "no netloader secret" in refusal(sign(SECRET, "POST", HOST, PLUGIN_PATH, BODY), None)


def test_the_route_and_the_command_agree_on_the_path() -> None:
    assert vllm_routes.PATH == PLUGIN_PATH
    plugin = vllm_routes.plugin()
    assert plugin.name == "netloader_routes" and plugin.required_tasks == ("generate",)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "JSON object"),
        (b'{"version": "2", "sources": ["a:1"], "shell": "rm"}', "unknown fields ['shell']"),
        (b'{"sources": ["a:1"]}', "'version'"),
        (b'{"version": true, "sources": ["a:1"]}', "'version'"),
        (b'{"version": "2", "sources": []}', "'sources'"),
        (b'{"version": "2", "sources": "a:1"}', "'sources'"),
        (b'{"version": "2", "sources": ["a:1"], "in_order": "yes"}', "'in_order'"),
    ],
)
def test_malformed_update_requests(body: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        vllm_routes._parse(body)


def test_a_well_formed_update_request() -> None:
    body = b'{"version": 2, "sources": ["a:1", "b:2"], "keep_previous": false}'
    assert vllm_routes._parse(body) == {
        "version": "2",
        "sources": ["a:1", "b:2"],
        "keep_previous": False,
    }


def test_the_workers_own_words_are_kept() -> None:
    wrapped = RuntimeError(
        "Call to collective_rpc method failed: Worker failed with error 'update to version 2 "
        "refused, the old version keeps serving: 1 of 1 ranks could not stage it', please "
        "check the stack trace above for the root cause"
    )
    assert vllm_routes._reason(wrapped).startswith("update to version 2 refused")
    assert vllm_routes._reason(ValueError("plain")) == "plain"


class _Request:
    """What `_read_bounded` reads of a Starlette request: headers and the body's stream."""

    def __init__(self, pieces: list[bytes], declared: int | None = None) -> None:
        self.pieces = pieces
        self.headers = {} if declared is None else {"content-length": str(declared)}

    async def stream(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            yield piece


def test_a_body_is_read_only_up_to_its_cap() -> None:
    cap = vllm_routes.MAX_BODY
    assert asyncio.run(vllm_routes._read_bounded(_Request([b"{}", b" "]))) == b"{} "
    assert asyncio.run(vllm_routes._read_bounded(_Request([b"x"], declared=cap + 1))) is None
    endless = _Request([b"x" * 4096] * (cap // 4096 + 2))  # chunked: no length declared
    assert asyncio.run(vllm_routes._read_bounded(endless)) is None
