"""`POST /netloader/update`: a live update as one signed request to vLLM's API server,
without VLLM_SERVER_DEV_MODE (which mounts `/collective_rpc`, `/sleep` and the rest of
the development routes beside vLLM's weight-update routes).

A `vllm.endpoint_plugins` entry point (`netloader_routes`); vLLM loads endpoint plugins
only when `VLLM_PLUGINS` names them, and then loads only the general plugins it names
too, so an instance runs with `VLLM_PLUGINS=netloader,netloader_routes` and
`--weight-transfer-config '{"backend": "netloader"}'`. The route takes
`{"version", "sources", "in_order", "keep_previous"}` (see `NetloaderUpdateInfo`), signed
with the netloader secret (`signing`; an instance without a secret refuses every
request), and runs the steps `netloader update` runs through the development routes, with
the same engine calls vLLM's own routes make: start, update (every rank stages and
verifies; any failure refuses it on all, and the update is ended unswitched), pause
(requests in flight finish), finish (the switch), resume. One update at a time.

Answers: 200 `{"switched": true, "version", "seconds"}`; 401 unsigned or badly signed;
400 a malformed request; 409 refused or busy, the old version serving
(`{"switched": false, "error"}`); 500 the switch itself failed, the instance left paused
(`{"switched": null, "error"}`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any

from netloader.config import NetloaderConfig
from netloader.settings import resolve_secret
from netloader.signing import SignedRequests

log = logging.getLogger(__name__)

PATH = "/netloader/update"
MAX_BODY = 64 << 10  # bytes: a version and a list of sources
REFUSALS_LOGGED_EVERY = 10.0  # seconds
FIELDS = {"version", "sources", "in_order", "keep_previous"}
_WORKER_ERROR = re.compile(r"Worker failed with error '(.*)', please check", re.S)


class Refused(Exception):
    """An update that did not switch: the old version keeps serving."""


class NetloaderRoutes:
    """The endpoint plugin: the route, and its state (the engine, the secret, a lock)."""

    name = "netloader_routes"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.engine: Any = None
        self.signed = SignedRequests(None)
        self.lock = asyncio.Lock()
        self.logged_at, self.unlogged = -REFUSALS_LOGGED_EVERY, 0

    def attach_router(self, app: Any) -> None:
        # A plain Starlette route: the handler takes the request as it is, unvalidated.
        app.add_route(PATH, self.update, methods=["POST"], include_in_schema=False)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        self.engine = engine_client
        extra = getattr(args, "model_loader_extra_config", None)
        config = NetloaderConfig.load(extra if isinstance(extra, dict | str) else None)
        self.signed = SignedRequests(resolve_secret(None, config.secret_file))
        if (servers := getattr(args, "api_server_count", None) or 1) > 1:
            log.warning(
                "netloader: %s with %d API server processes: each refuses the replays of "
                "the requests it has seen, not of those another one has",
                PATH,
                servers,
            )

    async def update(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        body = await _read_bounded(request)
        if body is None:
            return JSONResponse({"error": f"the request is over {MAX_BODY} bytes"}, 413)
        host = request.headers.get("host", "")
        refusal = self.signed.refusal("POST", host, PATH, body, request.headers)
        if refusal is not None:
            client = request.client
            self._refused(f"{client.host}:{client.port}" if client is not None else "?", refusal)
            return JSONResponse({"error": refusal}, 401)
        try:
            asked = _parse(body)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, 400)
        if self.engine is None:
            return JSONResponse({"error": "this server has no engine"}, 409)
        if self.lock.locked():
            return JSONResponse({"switched": False, "error": "an update is in progress"}, 409)
        async with self.lock:
            return await self._update(asked)

    async def _update(self, asked: dict[str, Any]) -> Any:
        from starlette.responses import JSONResponse

        version, engine, started = asked["version"], self.engine, time.perf_counter()
        if await engine.is_paused():  # e.g. left so by a switch that failed: never resumed
            why = "the instance is paused (a failed switch leaves it so): resume or restart it"
            return JSONResponse({"switched": False, "error": why}, 409)
        try:
            await self._stage_and_pause(asked)
        except Refused as exc:
            log.warning("netloader: %s: version %s refused: %s", PATH, version, exc)
            return JSONResponse({"switched": False, "error": str(exc)}, 409)
        try:
            await engine.finish_weight_update(version)
        except Exception as exc:
            log.exception("netloader: the switch to version %s failed", version)
            why = f"{_reason(exc)}; left paused, as its weights may mix versions: restart it"
            return JSONResponse({"switched": None, "error": why}, 500)
        try:
            await engine.resume_generation()
        except Exception as exc:
            log.exception("netloader: resuming after the switch to version %s failed", version)
            why = f"switched to version {version}, but resuming failed: {_reason(exc)}"
            return JSONResponse({"switched": True, "error": why}, 500)
        seconds = time.perf_counter() - started
        log.info("netloader: %s: switched to version %s in %.2f s", PATH, version, seconds)
        return JSONResponse({"switched": True, "version": version, "seconds": seconds})

    async def _stage_and_pause(self, asked: dict[str, Any]) -> None:
        """Start, stage on every rank, pause. On a failure, end the update unswitched if
        this request started it, and resume if it got as far as pausing; Refused says why.
        (A session this request did not start, e.g. one a failed switch left open, is not
        touched.)"""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        engine = self.engine
        undo: list[Callable[[], Awaitable[Any]]] = []
        try:
            await engine.start_weight_update()
            undo += [
                lambda: engine.update_weights(
                    request=WeightTransferUpdateRequest(update_info={"abort": True})
                ),
                lambda: engine.finish_weight_update(None),
            ]
            await engine.update_weights(request=WeightTransferUpdateRequest(update_info=asked))
            undo.append(engine.resume_generation)
            await engine.pause_generation(mode="wait")
        except BaseException as exc:  # a cancelled request (shutdown) is ended as well
            for step in undo:
                try:
                    await step()
                except Exception as ended:  # the rank that refused has ended its session
                    log.debug("netloader: ending the refused update: %s", ended)
            if not isinstance(exc, Exception):
                raise
            raise Refused(_reason(exc)) from None

    def _refused(self, peer: str, refusal: str) -> None:
        """Log a refused request: at most one line per REFUSALS_LOGGED_EVERY seconds, so
        that anyone who can reach the port cannot flood the log."""
        now = time.monotonic()
        self.unlogged += 1
        if now - self.logged_at >= REFUSALS_LOGGED_EVERY:
            more = f" ({self.unlogged - 1} more since the last line)" if self.unlogged > 1 else ""
            log.warning("netloader: %s from %s refused: %s%s", PATH, peer, refusal, more)
            self.logged_at, self.unlogged = now, 0


async def _read_bounded(request: Any) -> bytes | None:
    """The request's body, or None once it is over MAX_BODY (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY:
        return None
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            return None
    return bytes(body)


def _parse(body: bytes) -> dict[str, Any]:
    """The update_info of a request body; ValueError says what is wrong with it."""
    try:
        asked = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"the body is not JSON: {exc}") from None
    if not isinstance(asked, dict):
        raise ValueError("the body must be a JSON object")
    if unknown := set(asked) - FIELDS:
        raise ValueError(f"unknown fields {sorted(unknown)}; known: {sorted(FIELDS)}")
    version = asked.get("version")
    if not isinstance(version, str | int) or isinstance(version, bool) or str(version) == "":
        raise ValueError("'version' must be a non-empty string")
    sources = asked.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
        raise ValueError("'sources' must be a non-empty list of host:port strings")
    for flag in ("in_order", "keep_previous"):
        if not isinstance(asked.get(flag, False), bool):
            raise ValueError(f"{flag!r} must be true or false")
    return {**asked, "version": str(version)}


def _reason(exc: BaseException) -> str:
    """The worker's own words where vLLM wraps them."""
    text = str(exc)
    found = _WORKER_ERROR.search(text)
    return found.group(1) if found else text or type(exc).__name__


def plugin() -> NetloaderRoutes:
    """The `vllm.endpoint_plugins` entry point: a zero-argument factory."""
    return NetloaderRoutes()
