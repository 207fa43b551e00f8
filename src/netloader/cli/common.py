"""What the commands share: option types and groups, the options-to-configuration step,
clean failures, and serving until a signal."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from netloader.discovery import registry as reg
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import NetloaderError
from netloader.settings import Timeouts

if TYPE_CHECKING:  # imported where used: `netloader update` and `peers` start without torch
    from netloader.config import NetloaderConfig
    from netloader.server import Server

DRAIN_TIMEOUT = Timeouts.drain


class EndpointParam(click.ParamType):  # type: ignore[type-arg]
    name = "HOST:PORT"

    def __init__(self, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Endpoint:
        if isinstance(value, Endpoint):
            return value
        try:
            return parse_endpoint(value, allow_zero=self.allow_zero)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


metrics_option = click.option(
    "--metrics",
    type=EndpointParam(allow_zero=False),
    help="Expose Prometheus metrics at http://HOST:PORT/metrics (off by default).",
)


secret_option = click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="File holding the shared secret (default: $NETLOADER_SECRET if set).",
)


tls_cert_options = [
    click.option(
        "--tls-cert",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="Serve over TLS with this certificate (PEM; needs --tls-key).",
    ),
    click.option(
        "--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Its key."
    ),
]
tls_ca_option = click.option(
    "--tls-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Connect over TLS, trusting servers whose certificate this CA file signed.",
)


def _registry_url(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        return reg.check_registry_url(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def registry_url_option(help: str) -> Callable[[Any], Any]:
    """`--registry URL`, checked (its password masked in errors), with `help`."""
    return click.option(
        "--registry", callback=_registry_url, metavar="redis://[:password@]host:port/db", help=help
    )


registry_option = registry_url_option(
    "Redis registry of live servers: serve registers there, pull finds sources there."
)


def with_options(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def listen_options(listen_help: str) -> list[Callable[[Any], Any]]:
    return [
        click.option(
            "--listen",
            type=EndpointParam(allow_zero=True),
            default="127.0.0.1:0",
            show_default=True,
            help=listen_help,
        ),
        click.option("--advertise", help="Host to advertise when binding a wildcard address."),
    ]


def config_from(**fields: Any) -> NetloaderConfig:
    """The options of one command as a NetloaderConfig (rank 0), so the CLI sets up
    listeners, TLS, secrets and waves exactly as the configuration-driven API does."""
    from netloader.config import NetloaderConfig

    if (fields.get("TLS_CERT") is None) != (fields.get("TLS_KEY") is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    listen: Endpoint | None = fields.pop("listen", None)
    if listen is not None:
        fields["LISTEN_HOST"] = listen.host
        if listen.port:
            fields["LISTEN_PORT"] = listen.port
    return NetloaderConfig.from_dict(
        {key: str(v) if isinstance(v, Path) else v for key, v in fields.items() if v is not None}
    )


def fail_cleanly(fn: Callable[..., None]) -> Callable[..., None]:
    """Our own errors become one line on stderr and exit status 1, not a traceback."""

    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except (NetloaderError, OSError, ValueError) as exc:
            click.echo(f"netloader: error: {exc}", err=True)
            sys.exit(1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def process_age() -> float | None:
    """Seconds since this process started (Linux: /proc, to 10 ms); None elsewhere."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: start time
            now = float(uptime.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return now - started / os.sysconf("SC_CLK_TCK")


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def serve_until_signal(server: Server, drain_timeout: float = DRAIN_TIMEOUT) -> None:
    """Serve until SIGINT (stop now) or SIGTERM (drain: withdraw, finish the transfers in
    progress for up to `drain_timeout` seconds, then stop)."""
    received: list[int] = []
    stop = threading.Event()

    def note(signum: int, frame: object) -> None:
        received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, note)
    stop.wait()
    if received[0] == signal.SIGTERM:
        click.echo(f"netloader: draining (up to {drain_timeout:.0f} s)")
        sys.stdout.flush()
        server.drain(drain_timeout)
