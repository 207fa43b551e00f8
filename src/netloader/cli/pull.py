"""`netloader pull`: a model from its sources into a directory engines load as it is."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click

from netloader import transports
from netloader.checkpoint import INDEX_NAME, CheckpointWriter, shards_from_index
from netloader.cli.common import (
    EndpointParam,
    config_from,
    exit_on_signal,
    fail_cleanly,
    listen_options,
    metrics_option,
    process_age,
    registry_option,
    secret_option,
    serve_until_signal,
    tls_ca_option,
    tls_cert_options,
    with_options,
)
from netloader.client import Client
from netloader.config import NetloaderConfig
from netloader.endpoint import Endpoint
from netloader.errors import NetloaderError, SourceUnavailable
from netloader.files import check_files_manifest, empty_files, write_files
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
)
from netloader.server import LoadedTensors, Relay
from netloader.settings import Timeouts

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@click.command()
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
    "--version",
    "version",
    default="",
    help="Pull this version of the weights (a server that switched to a newer one in a live "
    "update keeps serving the one it had to those asking for it); refuse any other.",
)
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
@with_options(*listen_options("Where a wave member serves what it received."))
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@click.option("--stall-timeout", type=float, default=Timeouts.stall, show_default=True)
@metrics_option
@secret_option
@tls_ca_option
@with_options(*tls_cert_options)
@fail_cleanly
def pull(
    sources: tuple[Endpoint, ...],
    out_dir: Path,
    model_name: str | None,
    version: str,
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
    phases = _Phases()
    if metrics is not None:
        serve_metrics(metrics)
    config = config_from(
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
    signal.signal(signal.SIGTERM, exit_on_signal)
    if compile_cache is not None and not config.authenticates_sources():
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
        manifest = _manifest(config, all_sources, model_name, version)
        phases.end("manifest")
        client = client_for(config, all_sources, stripe=stripe)
        files = _pull_files(client, manifest.identity.model, identity=manifest.identity)
        shards = (
            shards_from_index(files[INDEX_NAME].numpy().tobytes(), manifest)
            if INDEX_NAME in files
            else None
        )
        phases.end("files")
        with CheckpointWriter(out_dir, manifest, shards) as writer:
            phases.end("layout")
            # The bar is closed before anything else is printed.
            with _progress_bar(manifest.total_bytes) as advance:
                report = client.load_into(
                    writer.tensors,
                    manifest.identity,
                    progress=advance,
                    observer=None if relay is None else relay.arrivals,
                )
            phases.end("receive")
            paths = writer.commit()
            phases.add(writer.timings)
            write_files(out_dir, files)  # the index last: it names shards that now exist
            phases.end("other files")
            pulled = True
            log.info("netloader: pull phases: %s", phases)
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
                serve_until_signal(relay)
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


def _manifest(
    config: NetloaderConfig, sources: list[Endpoint], model_name: str | None, version: str = ""
) -> Manifest:
    """The manifest of the first source that serves `model_name` (any model when None) in
    `version` (any when ""). A source serving another model or version (a stale or planted
    registry record) is passed over."""
    reasons: list[str] = []
    for source in sources:
        try:
            manifest = client_for(config, [source]).manifest(version=version)
            _check_model(manifest, model_name)
            if version and manifest.identity.version != version:
                raise NetloaderError(
                    f"{source} serves version {manifest.identity.version or '(unversioned)'!r}, "
                    f"not {version!r}"
                )
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


class _Phases:
    """Where a pull's time went, phase by phase (logged with -v; benchmarks/bench_pull_cli.py
    reads it): "start-up" is from the process's start to the command's."""

    def __init__(self) -> None:
        age = process_age()
        self.spans: dict[str, float] = {} if age is None else {"start-up": age}
        self._last = time.perf_counter()

    def end(self, name: str) -> None:
        """The phase `name` ends now; it began where the last one ended."""
        now = time.perf_counter()
        self.spans[name] = now - self._last
        self._last = now

    def add(self, spans: dict[str, float]) -> None:
        """Phases timed elsewhere, which ended just now."""
        self.spans.update(spans)
        self._last = time.perf_counter()

    def __str__(self) -> str:
        return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.spans.items())


@contextlib.contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr when it is a terminal (gone once the block is left), else
    nothing; yields the function that advances it by a byte count."""
    if not sys.stderr.isatty():
        yield lambda nbytes: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="pull") as bar:

        def advance(nbytes: int) -> None:
            bar.update(nbytes)

        yield advance


def _pull_compile_cache(client: Client, root: Path) -> None:
    """A vLLM seed's compile cache, verified, into the cache root `root`, each part at
    once; vLLM uses it only where its own cache key is the seed's."""
    from netloader.integrations.vllm_compile_cache import CompileKey, take_offered

    manifest = client.manifest(Part.COMPILE_CACHE)
    key = CompileKey.offered(manifest.identity.attributes, root)
    click.echo(f"netloader: {take_offered(client, manifest, key, manifest.identity)}")


def _names(paths: list[Path]) -> str:
    if len(paths) == 1:
        return str(paths[0])
    return f"{paths[0].parent} ({len(paths)} shards)"
