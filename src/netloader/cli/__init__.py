"""The `netloader` command line: serve a checkpoint, pull one, inspect a server, list live
peers, make a secret. One module per command group; `common` holds what they share."""

from __future__ import annotations

import logging

import click

from netloader.cli.info import inspect, peers, secret
from netloader.cli.pull import pull
from netloader.cli.serve import serve


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and transfer.")
def main(verbose: bool) -> None:
    """Serve model weights to peers, or pull them from one."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )


for command in (serve, pull, inspect, peers, secret):
    main.add_command(command)

__all__ = ["main"]
