"""A legitimate pull while the server is under attack, against the same pull in peace, in
one run: 128 slowloris connections (8 source addresses, each dripping a partial HELLO one
byte every 2 s) and a peer sending JSON bombs and 256 MiB MANIFEST claims before any
HELLO; with the server's resident memory idle, under the pre-authentication attacks, and
after. The server is a `netloader serve` process with a secret.

    .venv/bin/python benchmarks/bench_attacks.py --json runs/bench_attacks.json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import serve_checkpoint, write_json
from netloader import Client, Identity
from netloader import protocol as p
from netloader.testing.models import checkpoint_specs, empty_like, llama_like, write_checkpoint
from netloader.testing.processes import process_usage

SECRET = "bench attacks secret, long enough"


def _connect(address: str, source: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    return socket.create_connection((host, int(port)), 5, (source, 0))


class Slowloris:
    """`count` connections from 127.0.0.2..9, each dripping a HELLO a byte at a time and
    reconnecting when dropped, until stopped."""

    def __init__(self, address: str, count: int) -> None:
        self.address, self.count = address, count
        self.stop = threading.Event()
        self.dropped = 0
        self.threads = [threading.Thread(target=self._one, args=(i,)) for i in range(count)]
        for t in self.threads:
            t.start()

    def _one(self, i: int) -> None:
        hello = p.Hello(p.PROTOCOL_VERSION, p.new_nonce()).encode()
        while not self.stop.is_set():
            try:
                with _connect(self.address, f"127.0.0.{2 + i % 8}") as sock:
                    for byte in hello[:-1]:
                        sock.sendall(bytes([byte]))
                        if self.stop.wait(2.0):
                            return
            except OSError:
                self.dropped += 1
                self.stop.wait(0.1)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def bombs(address: str, stop: threading.Event) -> None:
    """Before any HELLO: a 64 MiB FETCH of `[{},{},...]`, and a 256 MiB MANIFEST claim."""
    bomb = b'{"chunks":[' + b"{}," * (1 << 20)
    frames = [
        p.HEADER.pack(p.MAGIC, p.MsgType.FETCH, 64 << 20) + bomb,
        p.HEADER.pack(p.MAGIC, p.MsgType.MANIFEST, 256 << 20) + b"{",
    ]
    while not stop.is_set():
        for frame in frames:
            with contextlib.suppress(OSError), _connect(address, "127.0.0.10") as sock:
                sock.sendall(frame)
                sock.recv(4096)


def pulls(client: Client, dest: Any, identity: Identity, repeat: int) -> list[float]:
    seconds = []
    for _ in range(repeat):
        started = time.perf_counter()
        client.load_into(dest, identity)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--slowloris", type=int, default=128)
    parser.add_argument(
        "--attack-seconds", type=float, default=20, help="longer than the handshake deadline"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        checkpoint = write_checkpoint(root / "model", llama_like(args.size_mib << 20))
        specs = checkpoint_specs(checkpoint)
        env = {**os.environ, "NETLOADER_SECRET": SECRET}
        server = serve_checkpoint(checkpoint.parent, root / "server.log", env=env)
        pid = server.proc.pid
        try:
            client = Client([server.address], secret=SECRET.encode())
            identity = client.manifest().identity  # a served checkpoint's, as it says
            dest = empty_like(specs, fill=0)
            pulls(client, dest, identity, 2)  # warm
            rss_idle = process_usage(pid)["VmRSS"]
            peace = pulls(client, dest, identity, args.repeat)
            loris = Slowloris(server.address, args.slowloris)
            stop = threading.Event()
            bomber = threading.Thread(target=bombs, args=(server.address, stop))
            bomber.start()
            time.sleep(3)  # the attack is in full swing
            rss_peak = rss_idle
            war: list[float] = []
            ends = time.monotonic() + args.attack_seconds
            while len(war) < args.repeat or time.monotonic() < ends:
                war += pulls(client, dest, identity, 1)
                rss_peak = max(rss_peak, process_usage(pid)["VmRSS"])
                time.sleep(0.5)
            stop.set()
            bomber.join()
            loris.close()
            time.sleep(1)
            rss_after = process_usage(pid)["VmRSS"]
            shed = server.log_text().count("to make room")
        finally:
            server.stop()
    result = {
        "bytes": sum(s.nbytes for s in specs),
        "pull_seconds_peace": statistics.median(peace),
        "pull_seconds_attack": statistics.median(war),
        "pull_seconds_attack_max": max(war),
        "rss_kb_idle": rss_idle,
        "rss_kb_peak_under_attack": rss_peak,
        "rss_kb_after": rss_after,
        "slowloris_connections": args.slowloris,
        "slowloris_dropped_and_reopened": loris.dropped,
        "connections_shed": shed,
    }
    print(
        f"pull of {result['bytes']} bytes: median {result['pull_seconds_peace']:.3f} s in "
        f"peace ({len(peace)} pulls), {result['pull_seconds_attack']:.3f} s under attack "
        f"({len(war)} pulls over {args.attack_seconds:g} s, max {max(war):.3f} s)\n"
        f"server RSS: idle {rss_idle} kB, peak under attack {rss_peak} kB "
        f"(+{rss_peak - rss_idle} kB), after {rss_after} kB\n"
        f"{args.slowloris} slowloris connections from 8 addresses ({loris.dropped} dropped "
        f"by the handshake deadline and reopened, {shed} shed to make room)"
    )
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
