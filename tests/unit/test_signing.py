"""Signed update requests (`netloader.signing`) and the update route's request checks
(`integrations.vllm_routes`), without vLLM: pure functions."""

from __future__ import annotations

import re

import pytest

from netloader.cli.update import PLUGIN_PATH
from netloader.integrations import vllm_routes
from netloader.signing import SIGNATURE_HEADER, TIME_HEADER, SignedRequests, sign

SECRET = b"a long enough secret, 16+ bytes"
BODY = b'{"version": "2", "sources": ["127.0.0.1:1"]}'
NOW = 1_800_000_000.0


def test_a_signed_request_is_taken_once() -> None:
    receiver = SignedRequests(SECRET)
    headers = sign(SECRET, "POST", PLUGIN_PATH, BODY, now=NOW)
    assert receiver.refusal("POST", PLUGIN_PATH, BODY, headers, now=NOW + 1) is None
    again = receiver.refusal("POST", PLUGIN_PATH, BODY, headers, now=NOW + 2)
    assert again is not None and "replay" in again


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"secret": b"another secret, just as long!!"}, "another secret"),
        ({"body": BODY.replace(b"2", b"3")}, "does not match"),
        ({"path": "/netloader/other"}, "does not match"),
        ({"method": "PUT"}, "does not match"),
        ({"now": NOW - 120}, "away from this clock"),
        ({"now": NOW + 120}, "away from this clock"),
    ],
)
def test_what_a_signature_covers(change: dict[str, object], reason: str) -> None:
    signed = {"secret": SECRET, "method": "POST", "path": PLUGIN_PATH, "body": BODY, "now": NOW}
    headers = sign(**{**signed, **change})  # type: ignore[arg-type]
    refusal = SignedRequests(SECRET).refusal("POST", PLUGIN_PATH, BODY, headers, now=NOW)
    assert refusal is not None and reason in refusal


def test_unsigned_and_secretless() -> None:
    assert "not signed" in str(SignedRequests(SECRET).refusal("POST", PLUGIN_PATH, BODY, {}))
    headers = {TIME_HEADER: "yesterday", SIGNATURE_HEADER: "00"}
    assert "not a time" in str(SignedRequests(SECRET).refusal("POST", PLUGIN_PATH, BODY, headers))
    headers = sign(SECRET, "POST", PLUGIN_PATH, BODY)
    refusal = SignedRequests(None).refusal("POST", PLUGIN_PATH, BODY, headers)
    assert refusal is not None and "no netloader secret" in refusal


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
