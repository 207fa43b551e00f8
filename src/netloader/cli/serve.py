"""`netloader serve`: a checkpoint in memory, served until a signal."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from netloader.api import versioned
from netloader.checkpoint import checkpoint_identity, load_checkpoint
from netloader.cli.common import (
    DRAIN_TIMEOUT,
    config_from,
    fail_cleanly,
    listen_options,
    metrics_option,
    registry_option,
    secret_option,
    serve_until_signal,
    tls_cert_options,
    with_options,
)
from netloader.discovery import registry as reg
from netloader.endpoint import Endpoint
from netloader.files import model_files
from netloader.manifest import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, MAX_COLUMN_TILES
from netloader.metrics import serve_metrics
from netloader.ranks import serve_rank
from netloader.settings import Limits


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, path_type=Path))
@with_options(*listen_options("Address to bind; port 0 picks a free port."))
@click.option(
    "--model", "model_name", help="Model name clients must ask for [default: directory name]."
)
@click.option(
    "--version",
    "version",
    help="The version of the weights (a trainer's release): running instances update to it "
    "and pull only the chunks that differ from the version they hold.",
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
@click.option(
    "--chunk-kib",
    type=click.IntRange(4, MAX_CHUNK_BYTES >> 10),
    default=DEFAULT_CHUNK_BYTES >> 10,
    show_default=True,
    help="Unit of transfer and verification, in KiB. Smaller chunks let a tensor-parallel "
    "client pull closer to only the rows it keeps, at some cost in speed.",
)
@click.option(
    "--column-tiles",
    type=click.IntRange(1, MAX_COLUMN_TILES),
    default=1,
    show_default=True,
    help="Cut each matrix larger than a chunk into this many column tiles, so that a "
    "tensor-parallel client pulls only the columns a row-parallel layer keeps (8 serves "
    "tp 2, 4 and 8); 1: rows only.",
)
@secret_option
@with_options(*tls_cert_options)
@fail_cleanly
def serve(
    model_dir: Path,
    listen: Endpoint,
    model_name: str | None,
    version: str | None,
    advertise: str | None,
    output_prefix: str | None,
    registry: str | None,
    metrics: Endpoint | None,
    drain_timeout: float,
    send_rate: float | None,
    sender_nice: int,
    chunk_kib: int,
    column_tiles: int,
    secret_file: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Load a safetensors checkpoint into memory and serve it until interrupted, with the
    directory's other files (config, tokenizer) for nodes that start with nothing. SIGTERM
    drains (withdraw, finish the transfers in progress, stop); SIGINT stops at once."""
    if metrics is not None:
        serve_metrics(metrics)
    config = config_from(
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
    identity = versioned(
        checkpoint_identity(model_name or model_dir.resolve().name, model_dir), version
    )
    files = model_files(model_dir) if model_dir.is_dir() else {}
    server = serve_rank(
        tensors,
        identity,
        config,
        0,
        files=files,
        chunk_bytes=chunk_kib << 10,
        column_tiles=column_tiles,
    )
    if server is None:
        raise click.UsageError(f"--listen {listen}: the port must be 0 or in 1024-65535")
    with server:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        click.echo(
            f"netloader: serving {identity.model} ("
            + (f"version {identity.version}, " if identity.version else "")
            + f"{len(tensors)} tensors, {size} bytes; "
            f"{len(files)} other files) on {server.address}",
            nl=True,
        )
        if registry is not None:
            click.echo(f"netloader: registering in {reg.mask_url(registry)} once serving")
        sys.stdout.flush()
        serve_until_signal(server, drain_timeout)
    click.echo("netloader: stopped")
