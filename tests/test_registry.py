"""Registry discovery against a real Redis server that each test starts on a free loopback
port: real `netloader serve` seeds registering themselves, real `netloader pull` clients
finding them with only --registry and --model, a seed killed with SIGKILL, the registry
stopped mid-wave and restarted, and planted records; an instance record (INSTANCE_URL) kept
with the version its rank 0 holds, and what `netloader update --registry` makes of the
records it finds. Skipped where `redis-server` or the `redis` library is missing
(scripts/setup.sh installs both where it can)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from netloader import NetloaderConfig
from netloader.discovery.registry import DEFAULT_TTL, Registry, instance_record
from netloader.manifest import Identity, build_manifest
from netloader.ranks import member, register_instance, serve_rank
from netloader.settings import new_secret
from netloader.testing.models import blocks, same_bytes, write_checkpoint
from netloader.testing.processes import ServerProcess
from support.redis_server import RedisServer, needs_redis
from support.servers import NETLOADER, StartCliServer, run_cli

pytestmark = needs_redis

SLACK = 5.0  # seconds beyond the TTL that a dead record may take to go (scheduling, polls)
MEMBER = re.compile(
    r"netloader: (?:wave member (?P<position>\d+)|outside the wave) "
    r"serving on (?P<address>[^,]+), pulling from (?P<sources>.*)$"
)


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return write_checkpoint(tmp_path / "ckpt", blocks(8)).parent


def garbage_server() -> str:
    """The "host:port" of a fake server that answers every connection with HTTP."""
    listener = socket.create_server(("127.0.0.1", 0))

    def answer() -> None:
        while True:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")

    threading.Thread(target=answer, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


def peers(url: str, model: str = "m") -> list[dict[str, Any]]:
    result = run_cli("peers", "--registry", url, "--model", model, "--json")
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.25)


def addresses(url: str) -> set[str]:
    """The addresses of the live servers (instance records, with a url, left out)."""
    return {r["address"] for r in peers(url) if "url" not in r}


def assert_same_checkpoint(out: Path, ckpt: Path) -> None:
    got, expected = load_file(out / "model.safetensors"), load_file(ckpt / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(same_bytes(got[n], expected[n]) for n in expected)


def test_a_client_with_only_the_registry_pulls_from_two_live_seeds(
    tmp_path: Path, registry: RedisServer, ckpt: Path, cli_server: StartCliServer
) -> None:
    seeds = [cli_server(ckpt, "--model", "m", "--registry", registry.url) for _ in range(2)]
    wanted = {s.address for s in seeds}
    wait_for(lambda: addresses(registry.url) == wanted, DEFAULT_TTL, "both seeds registered")
    text = run_cli("peers", "--registry", registry.url)
    assert text.returncode == 0 and all(
        f"m  checkpoint  rank 0  {a}" in text.stdout for a in wanted
    )
    assert all(r["transfers"] == 0 and r["since"] > 0 for r in peers(registry.url))
    assert peers(registry.url, model="other") == []

    result = run_cli(
        "pull", "--registry", registry.url, "--model", "m", "--out", str(tmp_path / "o")
    )
    assert result.returncode == 0, result.stderr
    listed = re.search(r"pulling from (.*)", result.stdout)
    assert listed is not None and set(listed[1].split(", ")) == wanted  # striped over both
    assert_same_checkpoint(tmp_path / "o", ckpt)

    # A clean stop deregisters at once.
    seeds[0].stop()
    assert addresses(registry.url) == {seeds[1].address}


def test_a_killed_seed_is_gone_within_the_ttl_and_never_tried(
    tmp_path: Path, registry: RedisServer, ckpt: Path, cli_server: StartCliServer
) -> None:
    dead, live = (cli_server(ckpt, "--model", "m", "--registry", registry.url) for _ in range(2))
    both = {dead.address, live.address}
    wait_for(lambda: addresses(registry.url) == both, DEFAULT_TTL, "both seeds registered")
    dead.kill()  # SIGKILL: no chance to deregister
    wait_for(
        lambda: addresses(registry.url) == {live.address},
        DEFAULT_TTL + SLACK,
        "the killed seed's record expired",
    )
    out = tmp_path / "o"
    result = run_cli("-v", "pull", "--registry", registry.url, "--model", "m", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"pulling from {live.address}\n" in result.stdout
    assert dead.address not in result.stdout + result.stderr  # not even a connect attempt
    assert_same_checkpoint(out, ckpt)


def test_the_registry_stopped_mid_wave_and_restarted(
    tmp_path: Path, registry: RedisServer, ckpt: Path, cli_server: StartCliServer
) -> None:
    seed = cli_server(ckpt, "--model", "m", "--registry", registry.url)
    wait_for(lambda: addresses(registry.url) == {seed.address}, DEFAULT_TTL, "seed registered")
    members: list[ServerProcess] = []

    def member(*extra: str) -> ServerProcess:
        i = len(members)
        argv = [NETLOADER, "pull", "--registry", registry.url, "--model", "m", "--join-wave"]
        argv += ["--out", str(tmp_path / f"m{i}"), *extra]
        members.append(ServerProcess(argv, log=tmp_path / f"m{i}.log", ready=MEMBER))
        members[-1].read_until("until interrupted")
        return members[-1]

    try:
        first = member()
        assert first.ready["position"] == "0" and first.ready["sources"] == seed.address

        registry.stop()
        second = member(seed.address)  # SOURCE given: the fallback
        assert second.ready["position"] is None and second.ready["sources"] == seed.address
        assert f"from {seed.address} over same-host, verified" in second.output
        fallbacks = [ln for ln in second.log_text().splitlines() if "using SOURCE only" in ln]
        assert len(fallbacks) == 1 and "unreachable" in fallbacks[0]

        registry.start()  # empty: everyone registers again from its heartbeat
        everyone = {seed.address, first.address, second.address}
        wait_for(lambda: addresses(registry.url) == everyone, DEFAULT_TTL + SLACK, "re-registered")
        third = member()
        assert third.ready["position"] is not None
        assert set(third.ready["sources"].split(", ")) <= everyone
        assert "verified" in third.output
    finally:
        codes = [m.stop(timeout=20) for m in members]
    assert codes == [0] * len(members), [m.log_text() for m in members]
    for i in range(len(members)):
        assert_same_checkpoint(tmp_path / f"m{i}", ckpt)


def test_planted_records_get_no_further_than_a_planted_wave_file(
    tmp_path: Path,
    registry: RedisServer,
    ckpt: Path,
    cli_server: StartCliServer,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(new_secret())
    genuine = cli_server(
        ckpt, "--model", "m", "--registry", registry.url, "--secret-file", str(secret)
    )
    forged = write_checkpoint(tmp_path / "forged", blocks(8, seed=7)).parent
    impostor = cli_server(forged, "--model", "m")  # same name, other bytes, no secret
    other = cli_server(ckpt, "--model", "other")  # another model
    junk = garbage_server()
    wait_for(lambda: addresses(registry.url) == {genuine.address}, DEFAULT_TTL, "registered")

    planted = [impostor.address, other.address, junk]
    db = registry.client()
    for address in planted:  # the oldest and least loaded: tried first
        record = {"model": "m", "tp_size": 1, "pp_size": 1, "rank": 0, "address": address}
        record |= {"transfers": 0, "since": 1.0, "layout": ""}
        db.set(f"netloader:m:1x1:rank0:{address}", json.dumps(record), ex=60)
    db.set("netloader:m:1x1:rank0:garbage", b"\xff not a record", ex=60)
    db.close()

    out = tmp_path / "o"
    args = ["pull", "--registry", registry.url, "--model", "m", "--secret-file", str(secret)]
    result = run_cli(*args, "--connect-timeout", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    listed = re.search(r"pulling from (.*)", result.stdout)
    assert listed is not None and set(listed[1].split(", ")) == {*planted, genuine.address}
    assert f"from {genuine.address} over same-host, verified" in result.stdout
    assert_same_checkpoint(out, ckpt)


def instances(url: str, model: str = "m") -> list[dict[str, Any]]:
    return [r for r in peers(url, model) if "url" in r]


def test_an_instance_record_shows_the_version_its_rank_0_holds_until_it_is_closed(
    registry: RedisServer,
) -> None:
    url = "http://127.0.0.1:8000"
    config = NetloaderConfig.load({"REGISTRY": registry.url, "INSTANCE_URL": url})
    identity = Identity("m", tp_size=2)
    tensors = {"w": torch.ones(4)}
    rank0 = member(0)
    server = serve_rank(tensors, identity, config, 0)
    assert server is not None
    try:
        rank0.attach(server)
        rank0.checkpoint = build_manifest(Identity("m", version="1"), tensors)
        heartbeat = register_instance(config, identity)
        assert heartbeat is not None and register_instance(config, identity) is heartbeat

        def listed() -> list[dict[str, Any]]:
            return instances(registry.url)

        wait_for(lambda: [r["version"] for r in listed()] == ["1"], DEFAULT_TTL, "published")
        (record,) = listed()
        assert record["url"] == url and record["address"] == str(server.address)
        assert (record["tp_size"], record["pp_size"], record["model"]) == (2, 1, "m")
        text = run_cli("peers", "--registry", registry.url).stdout
        assert f"m  instance {url}  tp2xpp1  version 1  netloader {server.address}" in text

        rank0.checkpoint = build_manifest(Identity("m", version="2"), tensors)  # a switch
        server.withdraw()  # as a switch with keep_previous false: the instance stays
        wait_for(lambda: [r["version"] for r in listed()] == ["2"], DEFAULT_TTL, "renewed")
        assert addresses(registry.url) == set()  # its server left the registry
        heartbeat.close()  # as on SIGTERM (at_drain)
        assert listed() == [] and heartbeat.stopped
    finally:
        server.close()
        rank0.server = rank0.checkpoint = None


def test_junk_instance_records_are_skipped(registry: RedisServer) -> None:
    good = instance_record("m", "http://127.0.0.1:8001", address="127.0.0.1:7001")
    other = instance_record("m:x", "http://127.0.0.1:8002")  # shares the key prefix of "m"
    db = registry.client()
    for record in (good, other):
        db.set(record.key, record.to_json(), ex=60)
    db.set("netloader-instance:m:http://127.0.0.1:8003", b"\xff not a record", ex=60)
    bad_url = {**json.loads(good.to_json()), "url": "http://127.0.0.1"}
    db.set("netloader-instance:m:http://127.0.0.1", json.dumps(bad_url), ex=60)
    db.set("netloader-instance:m:big", json.dumps({**bad_url, "model": "m" * 5000}), ex=60)
    db.close()
    found = Registry(registry.url, timeout=2)
    try:
        assert found.instances("m") == [good]
        assert found.instances() == [good, other]
    finally:
        found.close()
    assert instances(registry.url) == [json.loads(good.to_json())]


def test_update_from_the_registry_skips_instances_at_the_version_and_says_what_happened(
    registry: RedisServer,
) -> None:
    with socket.socket() as probe:  # a port nobody listens on: an instance that is gone
        probe.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{probe.getsockname()[1]}"
    dead = dataclasses.replace(instance_record("m", gone), version="1")
    done = instance_record("m", "http://127.0.0.1:8001", address="127.0.0.1:7001")
    done = dataclasses.replace(done, version="2")
    db = registry.client()
    for record in (dead, done):
        db.set(record.key, record.to_json(), ex=60)
    db.close()
    update = ["update", "--registry", registry.url, "--version", "2", "--source", "127.0.0.1:9"]
    result = run_cli(*update, "--model", "m", "--timeout", "5")
    assert result.returncode == 1
    assert f"{done.url} holds version 2 already: skipped" in result.stdout
    assert f"updating 1 instances of m, in order: {dead.url}\n" in result.stdout
    assert f"{dead.url} keeps its version: {dead.url}/netloader/update" in result.stderr
    assert "1 of 1 instances did not switch" in result.stderr

    result = run_cli(*update, "--model", "other")
    assert result.returncode == 1
    assert "no live instances of other in" in result.stderr and "INSTANCE_URL" in result.stderr

    registry.stop()
    result = run_cli(*update, "--model", "m")
    assert result.returncode == 1
    assert result.stderr.startswith(f"netloader: error: registry {registry.url} unreachable")
