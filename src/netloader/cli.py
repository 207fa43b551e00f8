"""The `netloader` command line: serve a checkpoint, pull one, inspect a server."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import torch
from tqdm import tqdm

from netloader import transports
from netloader.checkpoint import (
    INDEX_NAME,
    CheckpointWriter,
    checkpoint_identity,
    load_checkpoint,
    shards_from_index,
)
from netloader.client import Client
from netloader.config import NetloaderConfig
from netloader.discovery import registry as reg
from netloader.discovery.wave import listing
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import NetloaderError, SourceUnavailable
from netloader.files import check_files_manifest, empty_files, model_files, write_files
from netloader.integrations.vllm_compile_cache import CompileKey, take_offered
from netloader.manifest import Identity, Manifest
from netloader.metrics import serve_metrics
from netloader.protocol import Part
from netloader.ranks import (
    client_for,
    find_sources,
    join_registry_wave,
    join_wave,
    leave_wave,
    register_server,
    relay_rank,
    serve_rank,
)
from netloader.server import LoadedTensors, Relay, Server
from netloader.settings import Limits, Timeouts, new_secret, resolve_secret

DRAIN_TIMEOUT = 30.0  # seconds SIGTERM leaves transfers in progress to finish


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


registry_option = click.option(
    "--registry",
    callback=_registry_url,
    metavar="redis://[:password@]host:port/db",
    help="Redis registry of live servers: serve registers there, pull finds sources there.",
)


def _with(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


def _listen_options(listen_help: str) -> list[Callable[[Any], Any]]:
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


def _config(**fields: Any) -> NetloaderConfig:
    """The options of one command as a NetloaderConfig (rank 0), so the CLI sets up
    listeners, TLS, secrets and waves exactly as the configuration-driven API does."""
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


def _fail_cleanly(fn: Callable[..., None]) -> Callable[..., None]:
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


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and transfer.")
def main(verbose: bool) -> None:
    """Serve model weights to peers, or pull them from one."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )


@main.command()
@click.argument("model_dir", type=click.Path(exists=True, path_type=Path))
@_with(*_listen_options("Address to bind; port 0 picks a free port."))
@click.option(
    "--model", "model_name", help="Model name clients must ask for [default: directory name]."
)
@click.option("--output-prefix", help="Write the address to {prefix}0.txt once listening.")
@registry_option
@metrics_option
@click.option(
    "--drain-timeout",
    type=float,
    default=DRAIN_TIMEOUT,
    show_default=True,
    help="On SIGTERM, how long transfers in progress may take to finish.",
)
@click.option(
    "--send-rate",
    type=float,
    help="Bytes per second all transfers together may send [default: no cap].",
)
@click.option(
    "--sender-nice",
    type=click.IntRange(0, 19),
    default=Limits.sender_nice,
    show_default=True,
    help="Scheduling niceness of the threads that send.",
)
@secret_option
@_with(*tls_cert_options)
@_fail_cleanly
def serve(
    model_dir: Path,
    listen: Endpoint,
    model_name: str | None,
    advertise: str | None,
    output_prefix: str | None,
    registry: str | None,
    metrics: Endpoint | None,
    drain_timeout: float,
    send_rate: float | None,
    sender_nice: int,
    secret_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Load a safetensors checkpoint into memory and serve it until interrupted, with the
    directory's other files (config, tokenizer) for nodes that start with nothing. SIGTERM
    drains (withdraw, finish the transfers in progress, stop); SIGINT stops at once."""
    if metrics is not None:
        serve_metrics(metrics)
    config = _config(
        listen=listen,
        ADVERTISE_HOST=advertise,
        OUTPUT_PREFIX=output_prefix,
        REGISTRY=registry,
        SEND_RATE=send_rate,
        SENDER_NICE=sender_nice,
        SECRET_FILE=secret_file,
        TLS_CERT=tls_cert,
        TLS_KEY=tls_key,
    )
    tensors = load_checkpoint(model_dir)
    identity = checkpoint_identity(model_name or model_dir.resolve().name, model_dir)
    files = model_files(model_dir) if model_dir.is_dir() else {}
    server = serve_rank(tensors, identity, config, 0, files=files)
    if server is None:
        raise click.UsageError(f"--listen {listen}: the port must be 0 or in 1024-65535")
    with server:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        click.echo(
            f"netloader: serving {identity.model} ({len(tensors)} tensors, {size} bytes; "
            f"{len(files)} other files) on {server.address}",
            nl=True,
        )
        if registry is not None:
            click.echo(f"netloader: registering in {reg.mask_url(registry)} once serving")
        sys.stdout.flush()
        _serve_until_signal(server, drain_timeout)
    click.echo("netloader: stopped")


@main.command()
@click.argument("sources", nargs=-1, type=EndpointParam())
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the model into (the weights, sharded as the source's are, and "
    "the source's other files).",
)
@click.option("--model", "model_name", help="Refuse unless the server serves this model name.")
@click.option(
    "--no-weights",
    is_flag=True,
    help="Fetch only the model directory's other files (config, tokenizer), e.g. for an "
    "engine that then loads its weights from the same sources.",
)
@click.option(
    "--compile-cache",
    "compile_cache",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also take a vLLM seed's compile cache into this VLLM_CACHE_ROOT (code that vLLM will "
    "run: only with --secret-file/$NETLOADER_SECRET or --tls-ca).",
)
@click.option(
    "--transport", type=click.Choice(transports.names()), default=transports.AUTO, show_default=True
)
@click.option(
    "--stripe",
    type=click.IntRange(min=1),
    help="Pull from this many sources at once (default: all given, or 1 in a wave).",
)
@click.option(
    "--wave",
    "wave_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Join the scale-out wave in this shared directory: find sources there, relay to "
    "later members, and keep serving after the pull.",
)
@click.option(
    "--fanout",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Wave topology: members each relay to this many (1: a chain; 0: all from the seeds).",
)
@registry_option
@click.option(
    "--join-wave",
    "join_wave_",
    is_flag=True,
    help="With --registry: join the registry's wave of --model (relay to later members, "
    "keep serving after the pull).",
)
@_with(*_listen_options("Where a wave member serves what it received."))
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@click.option("--stall-timeout", type=float, default=Timeouts.stall, show_default=True)
@metrics_option
@secret_option
@tls_ca_option
@_with(*tls_cert_options)
@_fail_cleanly
def pull(
    sources: tuple[Endpoint, ...],
    out_dir: Path,
    model_name: str | None,
    no_weights: bool,
    compile_cache: Path | None,
    transport: str,
    stripe: int | None,
    wave_dir: Path | None,
    fanout: int,
    registry: str | None,
    join_wave_: bool,
    listen: Endpoint,
    advertise: str | None,
    connect_timeout: float,
    stall_timeout: float,
    metrics: Endpoint | None,
    secret_file: Path | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Fetch a model from SOURCES (all at once, disjoint parts from each) into a directory
    that engines load as it is: the weights as safetensors, verified, and the source's
    other files; or, with --wave, from the wave's seeds and members."""
    if metrics is not None:
        serve_metrics(metrics)
    config = _config(
        listen=listen,
        ADVERTISE_HOST=advertise,
        TRANSPORT=transport,
        CONNECT_TIMEOUT=connect_timeout,
        STALL_TIMEOUT=stall_timeout,
        SECRET_FILE=secret_file,
        TLS_CERT=tls_cert,
        TLS_KEY=tls_key,
        TLS_CA=tls_ca,
        WAVE_DIR=wave_dir,
        REGISTRY=registry,
    )
    if registry is not None and model_name is None:
        raise click.UsageError("--registry needs --model: the model to look up")
    if join_wave_ and (registry is None or wave_dir is not None):
        raise click.UsageError("--join-wave needs --registry, and no --wave")
    # SIGTERM unwinds like an error, so an interrupted pull removes its partial file.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    if compile_cache is not None and not _trusted(config):
        raise click.UsageError(
            "--compile-cache: a compile cache is code vLLM will run, so it is taken only from "
            "a source that proves the shared secret (--secret-file, $NETLOADER_SECRET) or a "
            "certificate you trust (--tls-ca)"
        )
    if no_weights:
        if wave_dir is not None or join_wave_:
            raise click.UsageError("--no-weights pulls no weights to relay: drop the wave")
        sources = tuple(_from_registry(config, model_name, sources))
        if not sources:
            raise click.UsageError("give SOURCES, or --registry with live servers")
        client = client_for(config, sources)
        files = _pull_files(client, model_name, required=True)
        written = write_files(out_dir, files)
        click.echo(f"netloader: pulled {len(written)} files into {out_dir}")
        if compile_cache is not None:
            _pull_compile_cache(client, compile_cache)
        return
    relay: Relay | None = None
    position: int | None = None
    pulled = False
    all_sources: list[Endpoint] = list(sources)
    if wave_dir is not None:
        relay = relay_rank(config, 0)
        if relay is None:
            raise click.UsageError(f"--listen {listen}: the port must be 0 or in 1024-65535")
        position, found = join_wave(config, 0, relay, fanout=fanout or None)
        all_sources = [*found, *all_sources]
        click.echo(
            f"netloader: wave member {position} serving on {relay.address}, "
            f"pulling from {', '.join(map(str, all_sources)) or 'nobody'}"
        )
        stripe = stripe or 1
    elif join_wave_:
        assert model_name is not None
        relay = relay_rank(config, 0)
        if relay is None:
            raise click.UsageError(f"--listen {listen}: the port must be 0 or in 1024-65535")
        joined, found = join_registry_wave(
            config, 0, relay, Identity(model_name), fanout=fanout or None
        )
        all_sources = list(dict.fromkeys([*found, *all_sources]))
        member = "outside the wave" if joined is None else f"wave member {joined}"
        click.echo(
            f"netloader: {member} serving on {relay.address}, "
            f"pulling from {', '.join(map(str, all_sources)) or 'nobody'}"
        )
        stripe = stripe or 1
    elif registry is not None:
        all_sources = _from_registry(config, model_name, sources)
        click.echo(f"netloader: pulling from {', '.join(map(str, all_sources)) or 'nobody'}")
    try:
        if not all_sources:
            raise click.UsageError(
                "give SOURCES, or --wave with a seed in it, or --registry with live servers"
            )
        manifest = _manifest(config, all_sources, model_name)
        client = client_for(config, all_sources, stripe=stripe)
        files = _pull_files(client, manifest.identity.model, identity=manifest.identity)
        shards = (
            shards_from_index(files[INDEX_NAME].numpy().tobytes(), manifest)
            if INDEX_NAME in files
            else None
        )
        with (
            CheckpointWriter(out_dir, manifest, shards) as writer,
            tqdm(
                total=manifest.total_bytes,
                unit="B",
                unit_scale=True,
                desc="pull",
                disable=not sys.stderr.isatty(),
            ) as bar,
        ):
            report = client.load_into(
                writer.tensors,
                manifest.identity,
                progress=bar.update,
                observer=None if relay is None else relay.arrivals,
            )
            paths = writer.commit()
            write_files(out_dir, files)  # the index last: it names shards that now exist
            pulled = True
            if relay is not None and files:  # later members can start with nothing too
                relay.offer_files(LoadedTensors(files, manifest.identity))
            click.echo(
                f"netloader: pulled {report.summary()} into {_names(paths)}; "
                f"{len(files)} other files"
            )
            if compile_cache is not None:
                _pull_compile_cache(client, compile_cache)
            if relay is not None:
                register_server(config, 0, relay, manifest.identity)
                click.echo(f"netloader: serving on {relay.address} until interrupted")
                sys.stdout.flush()
                _serve_until_signal(relay)
    finally:
        if relay is not None:
            if not pulled and position is not None:
                leave_wave(config, 0, position)  # later members must not pick us
            relay.close()


def _from_registry(
    config: NetloaderConfig, model_name: str | None, sources: tuple[Endpoint, ...]
) -> list[Endpoint]:
    """The registry's live servers of `model_name` (least loaded first), then `sources`."""
    if config.registry is None or model_name is None:
        return list(sources)
    found = find_sources(config, Identity(model_name), 0)
    return list(dict.fromkeys([*found, *sources]))


def _manifest(config: NetloaderConfig, sources: list[Endpoint], model_name: str | None) -> Manifest:
    """The manifest of the first source that serves `model_name` (any model when None). A
    source serving another model (a stale or planted registry record) is passed over."""
    reasons: list[str] = []
    for source in sources:
        try:
            manifest = client_for(config, [source]).manifest()
            _check_model(manifest, model_name)
        except NetloaderError as exc:
            reasons.append(str(exc))
            continue
        return manifest
    raise SourceUnavailable("; ".join(reasons) or "no sources given")


def _check_model(manifest: Manifest, model_name: str | None) -> None:
    if model_name is not None and manifest.identity.model != model_name:
        raise NetloaderError(f"server serves {manifest.identity.model!r}, not {model_name!r}")


def _pull_files(
    client: Client,
    model_name: str | None,
    *,
    identity: Identity | None = None,
    required: bool = False,
) -> dict[str, torch.Tensor]:
    """The model directory's other files from the first source that offers them, verified
    (checked to belong to `identity`, the weights' identity, when given). None offered:
    an error when `required`, else a note and nothing."""
    try:
        manifest = client.manifest(Part.FILES)
    except SourceUnavailable as exc:
        if required:
            raise
        click.echo(f"netloader: no model files from the sources, weights only ({exc})", err=True)
        return {}
    _check_model(manifest, model_name)
    if identity is not None and manifest.identity != identity:
        raise NetloaderError("the sources' files belong to another model than their weights")
    check_files_manifest(manifest)
    files = empty_files(manifest)
    client.load_into(files, manifest.identity, within=manifest, part=Part.FILES)
    # The index is where a pull's sharding comes from, and it is written last.
    return {name: files[name] for name in sorted(files, key=lambda n: n == INDEX_NAME)}


def _trusted(config: NetloaderConfig) -> bool:
    return resolve_secret(None, config.secret_file) is not None or config.tls_ca is not None


def _pull_compile_cache(client: Client, root: Path) -> None:
    """A vLLM seed's compile cache, verified, into the cache root `root`, each part at
    once; vLLM uses it only where its own cache key is the seed's."""
    manifest = client.manifest(Part.COMPILE_CACHE)
    key = CompileKey.offered(manifest.identity.attributes, root)
    click.echo(f"netloader: {take_offered(client, manifest, key, manifest.identity)}")


def _names(paths: list[Path]) -> str:
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0].parent} ({len(paths)} shards)"


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve_until_signal(server: Server, drain_timeout: float = DRAIN_TIMEOUT) -> None:
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


@main.command()
@click.argument("sources", nargs=-1, required=True, type=EndpointParam())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@secret_option
@tls_ca_option
@_fail_cleanly
def inspect(
    sources: tuple[Endpoint, ...],
    as_json: bool,
    connect_timeout: float,
    secret_file: Path | None,
    tls_ca: Path | None,
) -> None:
    """Print a server's manifest: model, layout, and every tensor."""
    config = _config(CONNECT_TIMEOUT=connect_timeout, SECRET_FILE=secret_file, TLS_CA=tls_ca)
    manifest = client_for(config, sources).manifest()
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=1))
        return
    click.echo(_describe(manifest))


@main.command()
@registry_option
@click.option(
    "--wave",
    "wave_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="List the seeds and live members of this wave directory instead.",
)
@click.option("--model", "model_name", help="Only servers of this model.")
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON.")
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@_fail_cleanly
def peers(
    registry: str | None,
    wave_dir: Path | None,
    model_name: str | None,
    as_json: bool,
    connect_timeout: float,
) -> None:
    """List live servers: model, layout, rank, address, transfers in progress, and since
    when (from a registry), or a wave directory's seeds and live members."""
    if (registry is None) == (wave_dir is None):
        raise click.UsageError("give one of --registry and --wave")
    if wave_dir is not None:
        entries = listing(wave_dir)
        if as_json:
            click.echo(json.dumps([vars(e) for e in entries], indent=1))
            return
        for e in entries:
            where = "seed" if e.position is None else f"member {e.position}"
            click.echo(f"rank {e.rank}{e.kind}  {where:<10}  {e.address}")
        return
    assert registry is not None
    with contextlib.closing(reg.Registry(registry, timeout=connect_timeout)) as found:
        records = found.records()
    chosen = sorted(
        (r for r in records if model_name is None or r.model == model_name),
        key=lambda r: (r.model, r.tp_size, r.pp_size, r.rank, r.transfers, r.since, r.address),
    )
    if as_json:
        click.echo(json.dumps([json.loads(r.to_json()) for r in chosen], indent=1))
        return
    if not chosen:
        click.echo(f"netloader: no live servers in {found.label}")
    for r in chosen:
        layout = r.layout or f"tp{r.tp_size}xpp{r.pp_size}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.since))
        click.echo(
            f"{r.model}  {layout}  rank {r.rank}  {r.address}  "
            f"transfers {r.transfers}  since {since}"
        )


@main.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
@_fail_cleanly
def secret(path: Path | None) -> None:
    """Make a random shared secret: print it, or write it to PATH (readable by you only)."""
    value = new_secret()
    if path is None:
        click.echo(value)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    click.echo(f"netloader: wrote a new secret to {path}")


def _describe(manifest: Manifest) -> str:
    ident = manifest.identity
    lines = [
        f"model {ident.model}  tp {ident.tp_rank}/{ident.tp_size}  "
        f"pp {ident.pp_rank}/{ident.pp_size}"
        + "".join(f"  {k}={v}" for k, v in sorted(ident.attributes.items())),
        f"{len(manifest.tensors)} tensors, {manifest.total_bytes} bytes, "
        f"chunks of {manifest.chunk_bytes} bytes",
    ]
    width = max((len(t.name) for t in manifest.tensors), default=0)
    for t in manifest.tensors:
        lines.append(
            f"{t.name:<{width}}  {t.dtype:<14} {list(t.shape)!s:<20} {t.nbytes:>14}  "
            f"{t.digests[0] if t.digests else ''}"
        )
    return "\n".join(lines)
