"""`netloader update`: switch running vLLM instances to a new version of their weights, in
place, with the `netloader` weight-transfer backend
(`--weight-transfer-config '{"backend": "netloader"}'`).

An instance that runs the `netloader_routes` endpoint plugin
(`VLLM_PLUGINS=netloader,netloader_routes`) takes the update as one request signed with the
netloader secret, `POST /netloader/update` (`integrations.vllm_routes`). Any other is driven
through vLLM's own weight-update routes, which it mounts only with `VLLM_SERVER_DEV_MODE=1`:
`/start_weight_update`, `/update_weights` (every rank stages what changed, verified; a
failure on any rank refuses it on all, the instance untouched, and `end_unswitched` ends
it), `/pause?mode=wait` (requests in flight finish, new ones wait), `/finish_weight_update`
(the switch), `/resume`. The plugin's route runs the same steps inside the instance.

An instance given as `URL=HOST:PORT` names its netloader server (LISTEN_PORT + rank): once
it has switched, that server relays what changed, and the instances after it pull from
the ones that switched before them (the last first), then from the sources: a chain, so
the publisher sends the delta once, not once per instance.

With `--registry URL --model NAME`, the instances are the live ones that the registry
lists for NAME (each vLLM instance with REGISTRY and INSTANCE_URL keeps its record there:
its URL, rank 0's netloader server, the version it holds): those at the version already
are skipped, the rest chained through their servers (`registry_fleet`).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from netloader import signing
from netloader.cli.common import fail_cleanly, registry_url_option, secret_option
from netloader.discovery import registry as reg
from netloader.endpoint import parse_endpoint
from netloader.errors import NetloaderError
from netloader.settings import Timeouts, resolve_secret

Instance = tuple[str, str | None]  # its URL, and its netloader server (rank 0's) or None
PLUGIN_PATH = "/netloader/update"  # integrations.vllm_routes.PATH (which imports vLLM's)


class UpdateFailed(NetloaderError):
    """An instance did not switch (it keeps serving the version it had)."""


def update_instance(
    url: str,
    version: str,
    sources: list[str],
    timeout: float,
    *,
    in_order: bool = False,
    keep_previous: bool = True,
    secret: bytes | None = None,
) -> float:
    """Switch the vLLM instance at `url` to `version` from `sources` (all at once, or one
    at a time `in_order`); the seconds it took. `keep_previous`: its servers go on serving
    the version it loaded (see the backend's `keep_previous`). `secret`: signs the request
    to the instance's `netloader_routes` plugin, where it runs one; without the plugin the
    development routes are used. Raises UpdateFailed with the instance's reason: before
    the switch, the update is ended and the instance keeps its version; if the switch
    itself fails, it is left paused."""
    started = time.perf_counter()
    asked: dict[str, Any] = {"version": version, "sources": sources, "in_order": in_order}
    if not keep_previous:
        asked["keep_previous"] = False
    if _update_by_plugin(url, asked, timeout, secret):
        return time.perf_counter() - started
    info = {"update_info": asked}
    _post(url, "/start_weight_update", None, timeout)
    try:
        _post(url, "/update_weights", info, timeout)  # staged on every rank, or refused
        _post(url, "/pause?mode=wait", None, timeout)
    except UpdateFailed:
        end_unswitched(url, timeout)
        with contextlib.suppress(UpdateFailed):
            _post(url, "/resume", None, timeout)
        raise
    try:
        _post(url, "/finish_weight_update", {"weight_version": version}, timeout)
    except UpdateFailed as exc:
        raise UpdateFailed(
            f"{exc}; left paused, as its weights may mix versions: restart it"
        ) from None
    _post(url, "/resume", None, timeout)
    return time.perf_counter() - started


@dataclass(frozen=True)
class Switched:
    """One instance's outcome in `update_fleet`: the seconds it took and where it pulled
    from first (another instance's server, or None: the sources), or why it did not."""

    url: str
    seconds: float = 0.0
    first: str | None = None
    failure: str | None = None


def update_fleet(
    instances: Sequence[Instance],
    version: str,
    sources: Sequence[str],
    timeout: float,
    *,
    keep_previous: bool = True,
    secret: bytes | None = None,
) -> Iterator[Switched]:
    """Switch `instances` ((url, its netloader server or None), see `parse_instance`) to
    `version`, one after the other, yielding each outcome as it comes: each pulls from
    the servers of those that switched before it, the last first, then from `sources`."""
    relays: list[str] = []  # of the instances that switched, the last first
    for url, relay in instances:
        try:
            seconds = update_instance(
                url,
                version,
                [*relays, *sources],
                timeout,
                in_order=bool(relays),
                keep_previous=keep_previous,
                secret=secret,
            )
        except UpdateFailed as exc:
            yield Switched(url, failure=str(exc))
            continue
        yield Switched(url, seconds, relays[0] if relays else None)
        if relay is not None:
            relays.insert(0, relay)


def _update_by_plugin(
    url: str, asked: dict[str, Any], timeout: float, secret: bytes | None
) -> bool:
    """Run the update through the instance's `POST /netloader/update`: True once it
    switched, False if the instance has no such route. UpdateFailed otherwise, with the
    instance's reason (or, when no answer came, that the outcome is not known)."""
    body = json.dumps(asked).encode()
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        host = urllib.parse.urlsplit(url).netloc  # what urllib sends as the Host header
        headers.update(signing.sign(secret, "POST", host, PLUGIN_PATH, body))
    request = urllib.request.Request(url.rstrip("/") + PLUGIN_PATH, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
        return True
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 405):
            return False
        detail = exc.read().decode(errors="replace")[:2000]
        with contextlib.suppress(ValueError):
            said = json.loads(detail)
            if isinstance(said, dict) and isinstance(said.get("error"), str):
                detail = said["error"]
        hint = " (--secret-file, or $NETLOADER_SECRET)" if "not signed" in detail else ""
        raise UpdateFailed(f"{url}{PLUGIN_PATH}: HTTP {exc.code}: {detail}{hint}") from None
    except urllib.error.URLError as exc:  # no connection: nothing was asked
        raise UpdateFailed(f"{url}{PLUGIN_PATH}: {exc.reason}") from None
    except (OSError, http.client.HTTPException) as exc:  # asked, but no answer came
        raise UpdateFailed(
            f"{url}{PLUGIN_PATH}: no answer ({exc or type(exc).__name__}): the instance may "
            "still switch; its log and `netloader peers` say which version it holds"
        ) from None


def end_unswitched(url: str, timeout: float) -> None:
    """End an update without switching: drop what the ranks staged (if a staging is still
    running, this waits behind it), then end vLLM's update session. A rank whose session
    vLLM already ended (the one that reported a refusal) answers with an error, ignored."""
    with contextlib.suppress(UpdateFailed):
        _post(url, "/update_weights", {"update_info": {"abort": True}}, timeout)
    with contextlib.suppress(UpdateFailed):
        _post(url, "/finish_weight_update", None, timeout)


def fleet_from_records(
    records: Iterable[reg.InstanceRecord], version: str
) -> tuple[list[Instance], list[reg.InstanceRecord]]:
    """Of the instances that `records` describe (registry records, one per URL): those to
    switch to `version`, in the order to switch them (see `update_fleet`), and those that
    hold it already. The order puts first the instances likeliest to switch and then relay
    to all the ones after them: those that name a netloader server (the others relay
    nothing), of those first the ones at pp 1 (at pp > 1 rank 0's server holds only its own
    stage's layers), then the ones that know the version they hold (loaded from a
    checkpoint server or updated since; an instance that loaded from disk digests its files
    first, and one that loaded from a vLLM peer is refused), then by URL."""
    chosen = {r.url: r for r in sorted(records, key=lambda r: r.since)}.values()
    current = sorted((r for r in chosen if r.version == version), key=lambda r: r.url)
    rest = sorted(
        (r for r in chosen if r.version != version),
        key=lambda r: (not r.address, r.pp_size > 1, not r.version, r.url),
    )
    return [(r.url, r.address or None) for r in rest], current


def registry_fleet(
    registry: str, model: str, version: str, timeout: float = Timeouts.connect
) -> tuple[list[Instance], list[reg.InstanceRecord]]:
    """`fleet_from_records` of the live instances of `model` in `registry` (a Redis URL).
    Raises RegistryError when the registry cannot be read within `timeout`."""
    with contextlib.closing(reg.Registry(registry, timeout=timeout)) as found:
        return fleet_from_records(found.instances(model), version)


def parse_instance(text: str) -> Instance:
    """`URL` or `URL=HOST:PORT` (its netloader server, which relays once it switched)."""
    url, _, relay = text.partition("=")
    if not url.startswith(("http://", "https://")):
        raise click.BadParameter(f"{text!r}: an instance is http(s)://host:port[=HOST:PORT]")
    if relay:
        try:
            parse_endpoint(relay)
        except ValueError as exc:
            raise click.BadParameter(f"{text!r}: its netloader server: {exc}") from None
    return url, relay or None


def _post(url: str, path: str, body: dict[str, Any] | None, timeout: float) -> None:
    data = json.dumps(body if body is not None else {}).encode()
    request = urllib.request.Request(
        url.rstrip("/") + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            reply.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        hint = " (is VLLM_SERVER_DEV_MODE=1 set?)" if exc.code == 404 else ""
        raise UpdateFailed(f"{url}{path}: HTTP {exc.code}{hint}: {detail}") from None
    except (urllib.error.URLError, TimeoutError) as exc:
        raise UpdateFailed(f"{url}{path}: {exc}") from None


@click.command()
@click.argument("instances", nargs=-1)
@registry_url_option(
    "Update the live instances of --model that this Redis registry lists (instances with "
    "INSTANCE_URL) instead of INSTANCES."
)
@click.option("--model", "model_name", help="With --registry: whose instances to update.")
@click.option("--version", "version", required=True, help="The version to switch to.")
@click.option(
    "--source",
    "sources",
    multiple=True,
    required=True,
    help="host:port of a checkpoint-format server of that version (repeatable).",
)
@click.option(
    "--drop-previous",
    is_flag=True,
    help="The instances' servers stop serving the version they loaded once they switch "
    "(by default they keep serving it, whole, to instances that ask for it).",
)
@click.option(
    "--timeout",
    type=float,
    default=600.0,
    show_default=True,
    help="Seconds per request (through the netloader_routes plugin, one request is the "
    "whole update of one instance).",
)
@secret_option
@fail_cleanly
def update(
    instances: tuple[str, ...],
    registry: str | None,
    model_name: str | None,
    version: str,
    sources: tuple[str, ...],
    drop_previous: bool,
    timeout: float,
    secret_file: Path | None,
) -> None:
    """Switch running vLLM INSTANCES (http://host:port, or http://host:port=HOST:PORT with
    the address of its netloader server, which then relays to the instances after it), or
    those that --registry lists for --model, to VERSION of their weights, in place, one
    after the other: each pulls what changed, verified, then switches between requests.
    One that fails keeps its version and says why; the rest go on."""
    if instances and registry is not None:
        raise click.UsageError("give INSTANCES or --registry, not both")
    if not instances and registry is None:
        raise click.UsageError("give the INSTANCES to update, or --registry and --model")
    if (registry is None) != (model_name is None):
        raise click.UsageError("--registry and --model go together")
    if registry is not None and model_name is not None:
        fleet = _from_registry(registry, model_name, version)
    else:
        fleet = [parse_instance(text) for text in instances]
    secret = resolve_secret(None, secret_file)
    failed = 0
    outcomes = update_fleet(
        fleet, version, sources, timeout, keep_previous=not drop_previous, secret=secret
    )
    for outcome in outcomes:
        if outcome.failure is not None:
            failed += 1
            click.echo(f"netloader: {outcome.url} keeps its version: {outcome.failure}", err=True)
            continue
        via = f" (from {outcome.first} first)" if outcome.first else ""
        click.echo(
            f"netloader: {outcome.url} switched to version {version} in "
            f"{outcome.seconds:.2f} s{via}"
        )
    if failed:
        raise UpdateFailed(f"{failed} of {len(fleet)} instances did not switch")


def _from_registry(registry: str, model: str, version: str) -> list[Instance]:
    """The instances of `model` to update, as `registry_fleet` finds them, saying which
    hold `version` already; UpdateFailed when the registry lists none."""
    fleet, current = registry_fleet(registry, model, version)
    if not fleet and not current:
        raise UpdateFailed(
            f"no live instances of {model} in {reg.mask_url(registry)} (a vLLM instance "
            "is listed there when it runs with REGISTRY and INSTANCE_URL)"
        )
    for record in current:
        click.echo(f"netloader: {record.url} holds version {version} already: skipped")
    if fleet:
        listed = ", ".join(url if relay is None else f"{url}={relay}" for url, relay in fleet)
        click.echo(f"netloader: updating {len(fleet)} instances of {model}, in order: {listed}")
    return fleet
