"""Prometheus metrics with real processes and sockets: a `netloader serve --metrics`
scraped over HTTP after real pulls (bytes, transfers, connections, refusals), and a
client's own counters when a proxy corrupts a chunk."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import netloader
from netloader import Client, Identity, IntegrityError, metrics
from netloader import protocol as p
from netloader.testing.models import blocks, write_checkpoint
from netloader.testing.vllm import free_port
from support.proxy import host_port
from support.servers import MakeProxy, StartCliServer, run_cli


def scrape(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample at http://ADDRESS/metrics, by (name, sorted labels)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_served_checkpoint_counts_what_it_sends_and_refuses(
    tmp_path: Path, cli_server: StartCliServer
) -> None:
    model = blocks(4)
    ckpt = write_checkpoint(tmp_path / "ckpt", model).parent
    (tmp_path / "key").write_text("a secret for the metrics test\n")
    where = f"127.0.0.1:{free_port()}"
    server = cli_server(ckpt, "--metrics", where, "--secret-file", str(tmp_path / "key"))
    pulled = run_cli(
        "pull", server.address, "--out", str(tmp_path / "a"), "--secret-file", str(tmp_path / "key")
    )
    assert pulled.returncode == 0, pulled.stderr
    with socket.create_connection(host_port(server.address), timeout=5) as liar:
        liar.sendall(p.Hello(p.PROTOCOL_VERSION, p.new_nonce()).encode())
        liar.recv(4096)  # WELCOME, with the server's proof
        liar.sendall(p.Auth("00" * 32).encode())  # a proof made without the secret
        liar.recv(4096)  # the refusal
    size = sum(t.numel() * t.element_size() for t in model.values())
    deadline = time.monotonic() + 10
    while True:  # the server's threads finish their bookkeeping after the client is done
        seen = scrape(where)
        if seen.get(("netloader_connections_open", ())) == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen[("netloader_sent_bytes_total", ())] == size
    assert seen[("netloader_transfers_started_total", (("side", "server"),))] >= 1
    finished = ("netloader_transfers_finished_total", (("outcome", "ok"), ("side", "server")))
    assert seen[finished] == seen[("netloader_transfers_started_total", (("side", "server"),))]
    assert seen[("netloader_refusals_total", (("reason", "auth"),))] >= 1
    assert seen[("netloader_connections_open", ())] == 0
    buckets = [v for (name, _), v in seen.items() if name.endswith("duration_seconds_count")]
    assert buckets and max(buckets) >= 1


def test_a_client_counts_a_corrupted_chunk_and_its_failed_pull(proxy: MakeProxy) -> None:
    model = {"w": torch.arange(1 << 20, dtype=torch.float32)}
    before = metrics.REGISTRY.get_sample_value("netloader_integrity_failures_total") or 0.0
    failed_before = (
        metrics.REGISTRY.get_sample_value(
            "netloader_transfers_finished_total", {"side": "client", "outcome": "integrity"}
        )
        or 0.0
    )
    with netloader.serve(model, "m") as server:
        corrupting = proxy(str(server.address), flip_at=2 << 20)
        with pytest.raises(IntegrityError):
            Client([corrupting.address]).load_into({"w": torch.empty(1 << 20)}, Identity("m"))
    assert metrics.REGISTRY.get_sample_value("netloader_integrity_failures_total") == before + 1
    failed = metrics.REGISTRY.get_sample_value(
        "netloader_transfers_finished_total", {"side": "client", "outcome": "integrity"}
    )
    assert failed == failed_before + 1
