"""Graceful drain, with real processes: SIGTERM to `netloader serve` lets the pull in
progress finish, sends a pull that arrives meanwhile to its other source at once, and
then exits; a draining relay tells the clients waiting on it to move on."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import netloader
from netloader import Client, Identity, SourceUnavailable
from netloader.testing.models import blocks, same_bytes, write_checkpoint
from support.servers import NETLOADER, MakeProxy, StartCliServer, run_cli


def test_sigterm_finishes_the_pull_in_progress_and_turns_new_ones_away(
    tmp_path: Path, cli_server: StartCliServer, proxy: MakeProxy
) -> None:
    model = blocks(8)
    ckpt = write_checkpoint(tmp_path / "ckpt", model).parent
    draining = cli_server(ckpt, "--drain-timeout", "60")
    other = cli_server(ckpt)
    slow = proxy(draining.address, rate=2 << 20)  # about 4 s for the whole model
    in_progress = subprocess.Popen(
        [NETLOADER, "pull", slow.address, "--out", str(tmp_path / "a")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while slow.forwarded < (2 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    draining.proc.send_signal(signal.SIGTERM)
    assert in_progress.poll() is None  # the drain begins while this pull is under way
    time.sleep(0.5)  # the server has begun draining
    started = time.monotonic()
    elsewhere = run_cli("pull", draining.address, other.address, "--out", str(tmp_path / "b"))
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert f"from {other.address} over same-host" in elsewhere.stdout  # nothing from the drainer
    assert time.monotonic() - started < 20
    _, err = in_progress.communicate(timeout=60)
    assert in_progress.returncode == 0, err
    for name in ("a", "b"):
        pulled = load_file(tmp_path / name / "model.safetensors")
        assert all(same_bytes(pulled[n], t) for n, t in model.items())
    draining.read_until("netloader: stopped")
    assert "netloader: draining" in draining.output
    assert draining.proc.wait(timeout=30) == 0


def test_a_draining_relay_sends_its_waiting_clients_on_at_once() -> None:
    """A client is waiting for a chunk the relay has not received when the relay drains:
    it is told at once, rather than after the relay's wait (here 0.8 x 30 s)."""
    timeouts = netloader.Timeouts(stall=30)
    relay = netloader.relay(timeouts=timeouts)
    identity = Identity("m")
    failure: list[BaseException] = []
    with netloader.serve({"w": torch.ones(4)}, identity) as upstream:
        manifest = Client([upstream.address]).manifest()
    relay.arrivals.begin(manifest, {"w": torch.empty(4)})  # nothing will arrive

    def pull() -> None:
        try:
            Client([relay.address], timeouts=timeouts).load_into({"w": torch.empty(4)}, identity)
        except SourceUnavailable as exc:
            failure.append(exc)

    waiting = threading.Thread(target=pull)
    waiting.start()
    deadline = time.monotonic() + 10
    while relay.transfers_in_progress == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert relay.transfers_in_progress == 1  # the client's FETCH waits on the relay
    started = time.monotonic()
    assert relay.drain(20)  # the waiting transfer ended: nothing cut off at the deadline
    waiting.join(timeout=20)
    assert time.monotonic() - started < 10
    assert failure and "draining" in str(failure[0]), failure


HOST = """
import logging, signal, sys, threading
import netloader
from netloader.server.drain import drain_on_sigterm
from netloader.testing.models import blocks

logging.basicConfig(level=logging.INFO)
stop = threading.Event()
def host_handler(signum, frame):  # the host's own shutdown, as vLLM's
    print("host handler ran", flush=True)
    stop.set()
signal.signal(signal.SIGTERM, host_handler)
server = netloader.serve(blocks(8), "m")
server.manifest()
drain_on_sigterm(lambda: [server], 60)
print(f"ADDR {server.address}", flush=True)
stop.wait()
print("host main returned", flush=True)
"""


def test_a_host_with_its_own_shutdown_drains_on_sigterm(tmp_path: Path, proxy: MakeProxy) -> None:
    """Inside a host process that has its own SIGTERM handler (a vLLM worker): on SIGTERM
    the host's handler still runs and its main returns, while the server withdraws, lets
    the pull in progress finish, and the process exits only then."""
    host = subprocess.Popen(
        [sys.executable, "-c", HOST], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert host.stdout is not None
    address = host.stdout.readline().split()[1]
    slow = proxy(address, rate=2 << 20)  # about 4 s for the whole model
    dest = {n: torch.empty_like(t) for n, t in blocks(8).items()}
    done: list[object] = []
    pull = threading.Thread(
        target=lambda: done.append(
            Client([slow.address], transport="tcp").load_into(dest, Identity("m"))
        )
    )
    pull.start()
    deadline = time.monotonic() + 30
    while slow.forwarded < (2 << 20) and time.monotonic() < deadline:
        time.sleep(0.05)
    host.send_signal(signal.SIGTERM)
    assert host.stdout.readline().strip() == "host handler ran"
    assert host.stdout.readline().strip() == "host main returned"
    assert host.poll() is None  # held open by the drain while the pull goes on
    pull.join(60)
    assert done and all(same_bytes(dest[n], t) for n, t in blocks(8).items())
    assert host.wait(timeout=30) == 0
    assert "draining" in host.stderr.read()
