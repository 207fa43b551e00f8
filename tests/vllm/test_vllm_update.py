"""Live updates of running vLLM instances with real vLLM: `netloader update` drives vLLM's
own weight-update routes (VLLM_SERVER_DEV_MODE=1) and the `netloader` weight-transfer
backend. Three instances hold version 1: one loaded from a checkpoint server, one from
the first (a vLLM peer, which told it which checkpoint that is), one from disk; version 2
(one decoder layer fine-tuned) is published by another server. Refused updates (a source
without the secret, a flipped byte, a publisher that dies halfway, another version) leave
the first answering exactly as before; the good one switches all three in place (same
processes, same servers, requests during the update all answered by one version or the
other), each from the one that switched before it (a relay; the one from disk found what
changed by digesting the files it loaded), each moving that one layer's bytes, after which
all answer exactly as a fresh vLLM started from version 2 on disk, and the first still
serves version 1, whole, with its checkpoint's manifest, to a client that asks for it.
The instances run with REGISTRY and INSTANCE_URL: the good update finds them in the
registry, in an order that lets each relay to the next, and their records then show
version 2. The one loaded from disk runs without VLLM_SERVER_DEV_MODE, with the
netloader_routes endpoint plugin: it takes updates as one request signed with the secret.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from netloader import Client, Manifest, SourceUnavailable
from netloader.cli.update import PLUGIN_PATH, registry_fleet
from netloader.discovery.registry import InstanceRecord, Registry
from netloader.protocol import Part
from netloader.signing import sign
from netloader.tensors import dtype_from_name
from netloader.testing.processes import ServerProcess
from netloader.testing.vllm import PROMPTS, VllmInstance, running
from support.proxy import FaultyProxy
from support.redis_server import RedisServer, needs_redis
from support.servers import run_cli
from support.vllm_checks import Starter, serve_directory, serve_line

pytestmark = [pytest.mark.vllm, needs_redis, pytest.mark.timeout(900)]

SECRET = "the live update e2e secret"
BACKEND = ("--weight-transfer-config", '{"backend": "netloader"}')
STAGED = re.compile(
    r"rank 0 staged version 2: (\d+) of (\d+) checkpoint tensors, (\d+) of (\d+) bytes pulled"
)
SENT = re.compile(r"netloader: sent \d+ chunks, (\d+) bytes to ")
DELIVERED = re.compile(r"netloader: loaded \d+ tensors, \d+ bytes in .* from (.+?) over ")


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file holding SECRET."""
    path = tmp_path_factory.mktemp("secret") / "key"
    path.write_text(SECRET)
    return path


@pytest.fixture(scope="module")
def publishers(
    tiny_model: Path, v2_model: Path, vllm_logs: Path, secret: Path
) -> Iterator[dict[str, ServerProcess]]:
    """Checkpoint servers: version 1 (what the instance loads) and version 2, with the
    secret; and version 2 without it."""
    chunks = ("--chunk-kib", "64")
    keyed = ("--secret-file", str(secret))
    started = {
        "v1": serve_directory(tiny_model, vllm_logs / "upd_v1.log", "--version", "1", *chunks,
                              *keyed),
        "v2": serve_directory(v2_model, vllm_logs / "upd_v2.log", "--version", "2", *chunks,
                              *keyed),
        "open": serve_directory(v2_model, vllm_logs / "upd_open.log", "--version", "2", *chunks),
    }  # fmt: skip
    try:
        yield started
    finally:
        for server in started.values():
            server.stop()


Fleet = tuple[VllmInstance, VllmInstance, VllmInstance, dict[str, str], dict[str, str]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis registry, stopped until `instances` starts it again (same port)."""
    server = RedisServer(tmp_path_factory.mktemp("upd_redis"))
    server.stop()
    yield server
    server.stop()


def instance_records(registry: RedisServer) -> list[InstanceRecord]:
    found = Registry(registry.url, timeout=5)
    try:
        return found.instances("tiny")
    finally:
        found.close()


def wait_for(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"not within {within} s: {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def instances(
    start: Starter,
    tiny_model: Path,
    v2_model: Path,
    publishers: dict[str, ServerProcess],
    registry: RedisServer,
) -> Iterator[Fleet]:
    """(three live instances, their version-1 answers, a fresh version-2 instance's): the
    first loaded from the version-1 checkpoint server, the second from disk (and taking
    updates through the netloader_routes plugin, not the development routes), the third
    from the first (a vLLM peer). All have REGISTRY and INSTANCE_URL, but the registry
    comes up only once they have loaded, so that each loads where this says (the second
    would otherwise find the first there, and load from it too). Their heartbeats publish
    them once it is up."""
    # Two cores that the asking keeps busy: the relaying instance's server runs at normal
    # priority (SENDER_NICE 0, not 10), and connecting to a busy peer may take a while.
    patient = {"MODEL": "tiny", "SENDER_NICE": 0, "CONNECT_TIMEOUT": 30, "STALL_TIMEOUT": 60}
    patient["REGISTRY"] = registry.url
    config = {**patient, "SOURCE": [{"device_id": 0, "sources": [publishers["v1"].address]}]}
    env = {"VLLM_SERVER_DEV_MODE": "1", "NETLOADER_SECRET": SECRET}
    live = start("upd_live", tiny_model, config, env=env, extra_args=BACKEND)
    # Updated through the netloader_routes plugin, without vLLM's development routes.
    routed = {"VLLM_PLUGINS": "netloader,netloader_routes", "NETLOADER_SECRET": SECRET}
    other = start("upd_other", tiny_model, patient, env=routed, extra_args=BACKEND)
    for instance in (live, other):  # its URL is known once made (NETLOADER_CONFIG merges)
        instance.env["NETLOADER_CONFIG"] = json.dumps({"INSTANCE_URL": instance.base_url})
    fresh = start("upd_fresh_v2", v2_model, None, load_format="auto", served_model_name="tiny")
    with running(live, other, fresh):
        version_2 = fresh.completions()
        fresh.stop()
        first = {**patient, "SOURCE": [{"device_id": 0, "sources": [serve_line(live).group(4)]}]}
        peer = start("upd_peer", tiny_model, first, env=env, extra_args=BACKEND)
        peer.env["NETLOADER_CONFIG"] = json.dumps({"INSTANCE_URL": peer.base_url})
        with running(peer):
            registry.start()
            version_1 = live.completions()
            assert version_1 != version_2, "version 2 answers as version 1 does: perturb more"
            assert other.completions() == version_1 == peer.completions()
            yield live, other, peer, version_1, version_2


def update(instances: Sequence[str], source: str, version: str = "2") -> tuple[int, str]:
    done = run_cli("update", *instances, "--version", version, "--source", source)
    return done.returncode, done.stdout + done.stderr


def staged_lines(instance: VllmInstance) -> list[str]:
    return [line for line in instance.netloader_lines() if "staged version" in line]


def post(
    instance: VllmInstance, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, str]:
    """The HTTP status and body of a POST to `instance`."""
    request = urllib.request.Request(
        instance.base_url + path, data=body, headers={"Content-Type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_the_update_route_takes_only_requests_signed_with_the_secret(instances: Fleet) -> None:
    """The instance with the netloader_routes plugin has no development routes, and its
    update route refuses unsigned, wrongly signed and replayed requests (it keeps its
    version, untouched)."""
    live, other, _, version_1, _ = instances
    assert post(other, "/start_weight_update", b"{}", {})[0] == 404
    assert post(other, "/collective_rpc", b"{}", {})[0] == 404
    body = json.dumps({"version": "2", "sources": ["127.0.0.1:1"]}).encode()
    host, key = other.base_url.removeprefix("http://"), SECRET.encode()
    refused = {
        "unsigned": ({}, "not signed"),
        "signed with another secret": (
            sign(b"not the secret of this fleet at all", "POST", host, PLUGIN_PATH, body),
            "another secret",
        ),
        "signed for another instance": (
            sign(key, "POST", live.base_url.removeprefix("http://"), PLUGIN_PATH, body),
            "another host",
        ),
        "malformed": (sign(key, "POST", host, PLUGIN_PATH, b"[]"), "JSON object"),
    }
    for case, (headers, reason) in refused.items():
        sent = body if case != "malformed" else b"[]"
        status, said = post(other, PLUGIN_PATH, sent, headers)
        assert status in (400, 401) and reason in said, (case, status, said)
    # Signed right, but the source is not there: refused by the ranks; a replay of it
    # is refused at the door.
    signed = sign(key, "POST", host, PLUGIN_PATH, body)
    status, said = post(other, PLUGIN_PATH, body, signed)
    assert status == 409 and "keeps serving" in said and "cannot connect" in said, said
    status, said = post(other, PLUGIN_PATH, body, signed)
    assert status == 401 and "replay" in said, said
    assert other.completions() == version_1


def test_refused_updates_leave_the_old_version_answering(
    instances: Fleet, publishers: dict[str, ServerProcess]
) -> None:
    live, _, _, version_1, _ = instances
    flipping = FaultyProxy(publishers["v2"].address, flip_at=100_000)
    dying = FaultyProxy(publishers["v2"].address, cut_at=600_000, reset=True)
    cases = {
        "a source without the secret": (publishers["open"].address, "2", "prove it knows"),
        "a flipped byte": (flipping.address, "2", "digest mismatch"),
        "a publisher that dies halfway": (dying.address, "2", "pull incomplete"),
        "another version": (publishers["v2"].address, "3", "version: expected '3', server has '2'"),
    }  # fmt: skip
    try:
        for case, (source, version, reason) in cases.items():
            code, said = update([live.base_url], source, version)
            assert code == 1 and "keeps its version" in said and reason in said, (case, said)
            assert live.completions() == version_1, case
    finally:
        flipping.close()
        dying.close()
    refused = [line for line in live.netloader_lines() if "keeps its weights" in line]
    assert len(refused) == len(cases), live.netloader_lines()


def test_an_update_switches_in_place_moving_one_layer_and_requests_see_one_version(
    instances: Fleet,
    publishers: dict[str, ServerProcess],
    tiny_model: Path,
    registry: RedisServer,
    secret: Path,
) -> None:
    """Each instance from the one that switched before it (the first from the publisher):
    the instances' registry records name their netloader servers, which relay what they
    took once they switched. The one that loaded from a vLLM peer knows its version from
    that peer, as the one that loaded from the checkpoint server does. The one with the
    netloader_routes plugin takes the update as one signed request."""
    live, other, peer, version_1, version_2 = instances
    fleet = (live, peer, other)
    pids = {i.name: i.proc.pid for i in fleet if i.proc is not None}
    relays = {i.base_url: serve_line(i).group(4) for i in fleet}
    relay = relays[live.base_url]
    loaded = Client([relay], secret=SECRET.encode()).manifest()  # version 1, vLLM's layout
    assert loaded.identity.version == "1"
    checkpoint_v1 = Client([publishers["v1"].address], secret=SECRET.encode()).manifest()
    told = [line for line in peer.netloader_lines() if "says these weights are" in line]
    assert told and f"{relay} says these weights are checkpoint version 1" in told[0], told
    # The instance records, published once the registry came up: the first two hold the
    # checkpoint server's version 1, the third (loaded from disk) a version not known.
    held = {live.base_url: "1", peer.base_url: "1", other.base_url: ""}
    wait_for(
        lambda: {r.url: r.version for r in instance_records(registry)} == held,
        60,
        "the instances published",
    )
    records = {r.url: r for r in instance_records(registry)}
    assert {url: r.address for url, r in records.items()} == relays
    probe = next(p for p in PROMPTS if version_1[p] != version_2[p])
    answers: list[str] = []
    stop = threading.Event()

    def ask_while_updating() -> None:
        while not stop.wait(0.1):  # a pause between requests leaves the relays some CPU
            answers.append(live.complete(probe))

    # The fleet as `netloader update --registry URL --model tiny` finds it: those that know
    # their version first (see fleet_from_records), each after pulling from the one before.
    chain, current = registry_fleet(registry.url, "tiny", "2")
    assert current == [] and chain[2] == (other.base_url, relays[other.base_url])
    assert {url for url, _ in chain[:2]} == {live.base_url, peer.base_url}
    before = {i.base_url: len(i.netloader_lines()) for i in fleet}
    asking = threading.Thread(target=ask_while_updating, daemon=True)
    asking.start()
    try:
        done = run_cli(
            "update", "--registry", registry.url, "--model", "tiny", "--version", "2",
            "--source", publishers["v2"].address, "--secret-file", str(secret), timeout=600,
        )  # fmt: skip
    finally:
        stop.set()
        asking.join(timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode == 0, "\n".join(
        [said, "publisher:", publishers["v2"].log_tail()]
        + [f"{i.name}:\n" + "\n".join(i.netloader_lines()[before[i.base_url] :]) for i in fleet]
    )
    (first, _), (second, _), (third, _) = chain
    assert re.search(rf"{first} switched to version 2 in [\d.]+ s\n", said), said
    assert f"{second} switched to version 2 in" in said, said
    assert f"(from {relays[first]} first)" in said, said
    assert f"{third} switched to version 2 in" in said, said
    assert f"(from {relays[second]} first)" in said, said
    for instance in fleet:
        assert instance.completions() == version_2, instance.name
        assert instance.proc is not None and instance.proc.pid == pids[instance.name]
        assert instance.proc.poll() is None  # no restart
        if instance is not other:  # a development route (the records say it for all)
            assert instance._get("/weight_info") == {"weight_version": "2"}
    # Their records show version 2 from their next renewals on; `update --registry` skips them.
    wait_for(
        lambda: {r.version for r in instance_records(registry)} == {"2"},
        60,
        "every record at version 2",
    )
    assert registry_fleet(registry.url, "tiny", "2")[0] == []
    assert answers and set(answers) <= {version_1[probe], version_2[probe]}, answers
    # Only the changed decoder layer moved (whole: it is post-processed as a unit), to each
    # from the one before it: all of it (none from the publisher after the first).
    by_url = {i.base_url: i for i in fleet}
    pulls = {}
    for instance in fleet:
        staged = [m for line in staged_lines(instance) if (m := STAGED.search(line))]
        assert len(staged) == 1, instance.netloader_lines()
        tensors, total_tensors, pulled, total = map(int, staged[0].groups())
        assert 0 < tensors < total_tensors and 0 < pulled < total // 2, staged[0].group(0)
        pulls[instance.base_url] = pulled
    assert len(set(pulls.values())) == 1, pulls
    for instance in (live, peer):
        assert "chunks that differ from the version it holds (1)" in staged_lines(instance)[0]
    digested = staged_lines(other)[0]
    assert f"chunks that differ from the checkpoint it loaded from {tiny_model}" in digested
    # Who delivered (a pull's summary names them): the publisher to the first only, the
    # instances that switched to the others (usually the one just before; on these two
    # busy cores a starved relay can miss the connect timeout, and the next one serves).
    servers = set(relays.values())
    relayed = 0
    for url in (first, second, third):
        lines = by_url[url].netloader_lines()[before[url] :]
        delivered = [m.group(1) for line in lines if (m := DELIVERED.search(line))]
        assert len(delivered) == 1, lines
        if url == first:
            assert delivered[0] == publishers["v2"].address, lines
        else:
            assert set(delivered[0].split(", ")) <= servers, lines
        relayed += sum(int(m.group(1)) for line in lines if (m := SENT.search(line)))
    assert relayed == pulls[second] + pulls[third]  # all of it, none from the publisher
    # What the first serves now: to those updating, version 2's manifest and only the
    # chunks it took; to any other, version 1 as it loaded it, whole and verified (the
    # parameters the switch overwrote in place were copied before it), and the manifest
    # of that checkpoint, for an instance that loads it to know what it holds.
    client = Client([relay], secret=SECRET.encode())
    delta = client.manifest(version="2")
    assert delta.identity.version == "2"
    with pytest.raises(SourceUnavailable, match="holds only what changed from version 1"):
        client.load_into(empty_like(delta), delta.identity)
    assert client.manifest() == loaded
    report = client.load_into(empty_like(loaded), loaded.identity)
    assert report.bytes == loaded.total_bytes and report.verified
    assert client.manifest(Part.CHECKPOINT, version="1") == checkpoint_v1


def empty_like(manifest: Manifest) -> dict[str, torch.Tensor]:
    return {t.name: torch.empty(t.shape, dtype=dtype_from_name(t.dtype)) for t in manifest.tensors}
