"""Draining a process's servers when it is told to stop, inside a host that has its own
shutdown (a vLLM engine or worker process): on SIGTERM each server withdraws from the
registry at once and lets its transfers in progress finish, in threads of their own,
while the host's own handler runs as before; the process exits once the drains are done
or their deadline passed, whichever comes first (the threads are not daemons, so the
interpreter waits for them at exit)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from netloader.server.server import Server

log = logging.getLogger("netloader.drain")

_lock = threading.Lock()
_installed = False
_started = False
_timeout = 0.0  # the latest caller's: a process loads (and serves) more than once
_on_drain: list[Callable[[], None]] = []


def at_drain(callback: Callable[[], None]) -> None:
    """Call `callback` (in a thread of its own) when this process starts draining on
    SIGTERM, beside its servers' drains: e.g. to leave a registry with something that is
    not a server."""
    with _lock:
        _on_drain.append(callback)


def drain_on_sigterm(servers: Callable[[], Iterable[Server]], timeout: float) -> bool:
    """On this process's first SIGTERM, drain every server `servers()` then names, for up
    to `timeout` seconds, and run the handler that was there before (the host's own
    shutdown). Once per process, from its main thread (where signal handlers are set);
    returns whether it is installed now."""
    global _installed, _timeout
    with _lock:
        _timeout = timeout
        if _installed:
            return True
        if threading.current_thread() is not threading.main_thread():
            log.warning("netloader: not in the main thread, so SIGTERM does not drain")
            return False
        previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _handler(servers, previous))
        _installed = True
        return True


def _handler(
    servers: Callable[[], Iterable[Server]], previous: Any
) -> Callable[[int, FrameType | None], None]:
    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        global _started
        if not _started:
            _started = True
            for callback in _on_drain:
                threading.Thread(target=callback, name="netloader-drain", daemon=False).start()
            for server in servers():
                # Not a daemon: the interpreter waits for it before the process exits.
                threading.Thread(
                    target=server.drain, args=(_timeout,), name="netloader-drain", daemon=False
                ).start()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: stop, once drained
            raise SystemExit(128 + signum)

    return on_sigterm
