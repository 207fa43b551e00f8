"""The `netloader` command line: serve a checkpoint, pull one, inspect a server, list live
peers, make a secret, update running vLLM instances. One module per command group;
`common` holds what they share."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
from typing import Any, NoReturn

import click

# command -> its module, imported only when the command runs (or --help lists them): the
# commands that move no tensors (update, peers, secret) start without importing torch,
# which on a busy machine can take longer than the command itself.
COMMANDS = {
    "serve": "serve",
    "pull": "pull",
    "inspect": "info",
    "peers": "info",
    "secret": "info",
    "update": "update",
}


class _Commands(click.Group):
    """The command group, its commands imported on first use (`COMMANDS`). Run as the
    program (its arguments taken from sys.argv), it ends without the interpreter's
    teardown, which with torch loaded takes 0.3-0.5 s to free what the process's end frees
    anyway; called with arguments (click's CliRunner, a test), it behaves as any click
    group."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        module = COMMANDS.get(cmd_name)
        if module is None:
            return None
        command = getattr(importlib.import_module(f"netloader.cli.{module}"), cmd_name)
        assert isinstance(command, click.Command)
        return command

    def main(self, *args: Any, **kwargs: Any) -> Any:
        as_program = not args and kwargs.get("args") is None
        if not as_program or not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        try:
            super().main(*args, **kwargs)
        except SystemExit as exc:
            _leave(exc.code)
        _leave(0)


def _leave(code: object) -> NoReturn:
    """Exit with `code` as SystemExit would, once output is flushed, skipping teardown."""
    if code is None or isinstance(code, int):
        status = code or 0
    else:
        print(code, file=sys.stderr)
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(status)


@click.group(cls=_Commands)
@click.option("-v", "--verbose", is_flag=True, help="Log every connection and transfer.")
def main(verbose: bool) -> None:
    """Serve model weights to peers, or pull them from one."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )


__all__ = ["main"]
