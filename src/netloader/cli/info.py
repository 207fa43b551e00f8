"""`netloader inspect`, `peers` and `secret`: what a server offers, who is live, a new
secret."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from netloader.cli.common import (
    EndpointParam,
    config_from,
    fail_cleanly,
    registry_option,
    secret_option,
    tls_ca_option,
)
from netloader.discovery import registry as reg
from netloader.discovery.wave import listing
from netloader.endpoint import Endpoint
from netloader.settings import Timeouts, new_secret

if TYPE_CHECKING:
    from netloader.manifest import Manifest


@click.command()
@click.argument("sources", nargs=-1, required=True, type=EndpointParam())
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option(
    "--version",
    "version",
    default="",
    help="Ask for this version of the weights (a server that switched in a live update "
    "keeps the one it had).",
)
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@secret_option
@tls_ca_option
@fail_cleanly
def inspect(
    sources: tuple[Endpoint, ...],
    as_json: bool,
    version: str,
    connect_timeout: float,
    secret_file: Path | None,
    tls_ca: Path | None,
) -> None:
    """Print a server's manifest: model, layout, and every tensor."""
    config = config_from(CONNECT_TIMEOUT=connect_timeout, SECRET_FILE=secret_file, TLS_CA=tls_ca)
    from netloader.ranks import client_for  # torch: only this command needs it

    manifest = client_for(config, sources).manifest(version=version)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=1))
        return
    click.echo(_describe(manifest))


@click.command()
@registry_option
@click.option(
    "--wave",
    "wave_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="List the seeds and live members of this wave directory instead.",
)
@click.option("--model", "model_name", help="Only servers and instances of this model.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print the records as JSON (an instance's has a url)."
)
@click.option("--connect-timeout", type=float, default=Timeouts.connect, show_default=True)
@fail_cleanly
def peers(
    registry: str | None,
    wave_dir: Path | None,
    model_name: str | None,
    as_json: bool,
    connect_timeout: float,
) -> None:
    """List live servers: model, layout, rank, address, version, transfers in progress,
    and since when, and live vLLM instances: model, URL, layout, the version they hold,
    rank 0's server (from a registry); or a wave directory's seeds and live members."""
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
        instances = found.instances(model_name)
    chosen = sorted(
        (r for r in records if model_name is None or r.model == model_name),
        key=lambda r: (r.model, r.tp_size, r.pp_size, r.rank, r.transfers, r.since, r.address),
    )
    if as_json:
        listed = [r.to_json() for r in chosen] + [i.to_json() for i in instances]
        click.echo(json.dumps([json.loads(text) for text in listed], indent=1))
        return
    if not chosen:
        click.echo(f"netloader: no live servers in {found.label}")
    for r in chosen:
        layout = r.layout or f"tp{r.tp_size}xpp{r.pp_size}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.since))
        click.echo(
            f"{r.model}  {layout}  rank {r.rank}  {r.address}  "
            + (f"version {r.version}  " if r.version else "")
            + f"transfers {r.transfers}  since {since}"
        )
    for i in instances:
        click.echo(
            f"{i.model}  instance {i.url}  tp{i.tp_size}xpp{i.pp_size}  "
            f"version {i.version or '(not known)'}  netloader {i.address or '(none)'}"
        )


@click.command()
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path), required=False)
@fail_cleanly
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
        + (f"  version {ident.version}" if ident.version else "")
        + "".join(f"  {k}={v}" for k, v in sorted(ident.attributes.items())),
        f"{len(manifest.tensors)} tensors, {manifest.total_bytes} bytes, "
        f"{manifest.chunk_total} chunks of up to {manifest.chunk_bytes} bytes"
        + (
            f", matrices in {manifest.column_tiles} column tiles"
            if manifest.column_tiles > 1
            else ""
        ),
    ]
    width = max((len(t.name) for t in manifest.tensors), default=0)
    for i, t in enumerate(manifest.tensors):
        chunks = manifest.chunks_of(i)
        where = f"chunk {chunks[0]}" if len(chunks) == 1 else f"chunks {chunks[0]}-{chunks[-1]}"
        lines.append(
            f"{t.name:<{width}}  {t.dtype:<14} {list(t.shape)!s:<20} {t.nbytes:>14}  {where}"
        )
    return "\n".join(lines)
