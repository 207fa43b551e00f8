"""vLLM instance records in the registry, without a network: INSTANCE_URL and its checks,
the records' encoding (and junk from an untrusted registry), the order `netloader update
--registry` switches instances in, and the command's argument errors.
tests/test_registry.py runs them against a real Redis server, and
tests/vllm/test_vllm_update.py with real vLLM instances."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from netloader import NetloaderConfig
from netloader.cli import main
from netloader.cli.update import fleet_from_records
from netloader.discovery.registry import (
    InstanceRecord,
    Record,
    check_instance_url,
    instance_key,
    instance_record,
)
from netloader.errors import ConfigError

REGISTRY = "redis://127.0.0.1:6379/0"


def instance(url: str, **fields: object) -> InstanceRecord:
    values: dict[str, object] = {"model": "m", "since": 5.0}
    values.update(fields)
    return InstanceRecord(url=url, **values)  # type: ignore[arg-type]


def test_instance_urls_are_http_host_and_port_alone() -> None:
    for good in ("http://10.0.0.7:8000", "https://vllm-3.internal:443/", "http://[::1]:8000"):
        assert check_instance_url(good) == good
    bad = {
        "10.0.0.7:8000": "must start with http",
        "ftp://h:21": "must start with http",
        "http://h": "names no port",
        "http://:8000": "names no host",
        "http://h:99999": "bad instance URL",
        "http://h:8000/v1": "alone",
        "http://user:pw@h:8000": "alone",
        "http://h:8000?x=1": "alone",
    }
    for url, reason in bad.items():
        with pytest.raises(ValueError, match=reason) as refused:
            check_instance_url(url)
        assert ":pw@" not in str(refused.value)  # a password is never shown


def test_instance_url_is_a_checked_field_that_needs_the_registry() -> None:
    config = NetloaderConfig.load({"REGISTRY": REGISTRY, "INSTANCE_URL": "http://10.0.0.7:8000"})
    assert config.instance_url == "http://10.0.0.7:8000"
    assert NetloaderConfig.load({"REGISTRY": REGISTRY}).instance_url is None
    with pytest.raises(ConfigError, match=r"INSTANCE_URL.*names no port"):
        NetloaderConfig.load({"REGISTRY": REGISTRY, "INSTANCE_URL": "http://10.0.0.7"})
    with pytest.raises(ConfigError, match=r"INSTANCE_URL.*non-empty string"):
        NetloaderConfig.load({"REGISTRY": REGISTRY, "INSTANCE_URL": 8000})
    with pytest.raises(ConfigError, match=r"INSTANCE_URL.*needs REGISTRY"):
        NetloaderConfig.load({"INSTANCE_URL": "http://10.0.0.7:8000"})


def test_instance_records_round_trip_and_junk_is_no_record() -> None:
    made = instance_record("org/m", "http://10.0.0.7:8000", tp_size=2, address="10.0.0.7:7000")
    assert made.since > 0 and made.version == ""
    assert made.key == instance_key("org/m", "http://10.0.0.7:8000")
    assert made.key == "netloader-instance:org/m:http://10.0.0.7:8000"
    assert InstanceRecord.from_json(made.to_json()) == made
    serverless = instance("http://10.0.0.8:8000", version="2")  # rank 0 does not serve
    assert InstanceRecord.from_json(serverless.to_json()) == serverless
    good = json.loads(made.to_json())
    junk: list[bytes | str | None] = [
        None,
        b"not json",
        b"\xff\xfe",
        "[]",
        json.dumps({**good, "url": "10.0.0.7:8000"}),
        json.dumps({**good, "url": "http://10.0.0.7"}),
        json.dumps({**good, "url": "http://u:pw@10.0.0.7:8000"}),
        json.dumps({**good, "address": "no-port"}),
        json.dumps({**good, "model": ""}),
        json.dumps({**good, "tp_size": 0}),
        json.dumps({**good, "pp_size": True}),
        json.dumps({**good, "version": 2}),
        json.dumps({**good, "since": "yesterday"}),
        json.dumps({**good, "since": float("inf")}),
        json.dumps({k: v for k, v in good.items() if k != "version"}),
        json.dumps({**good, "version": "x" * 5000}),
    ]
    for data in junk:
        assert InstanceRecord.from_json(data) is None, data
    # A server record is no instance record, and the other way round.
    server = Record("m", 1, 1, 0, "10.0.0.7:7000")
    assert InstanceRecord.from_json(server.to_json()) is None
    assert Record.from_json(made.to_json()) is None


def test_the_fleet_skips_instances_at_the_version_and_puts_likely_relays_first() -> None:
    records = [
        instance("http://a:1", address="a:7000", version=""),  # loaded from disk
        instance("http://b:1", address="b:7000", version="1"),  # from a checkpoint server
        instance("http://c:1", version="1"),  # rank 0 serves nothing: relays nothing
        instance("http://d:1", address="d:7000", version="2"),  # switched already
        instance("http://e:1", address="e:7000", version="1", pp_size=2),  # one stage's
        instance("http://f:1", address="f:7000", version="1"),
        instance("http://b:1", address="b:7001", version="1", since=1.0),  # older: replaced
    ]
    fleet, current = fleet_from_records(records, "2")
    assert fleet == [
        ("http://b:1", "b:7000"),
        ("http://f:1", "f:7000"),
        ("http://a:1", "a:7000"),
        ("http://e:1", "e:7000"),
        ("http://c:1", None),
    ]
    assert [r.url for r in current] == ["http://d:1"]
    assert fleet_from_records([], "2") == ([], [])


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "give the INSTANCES to update, or --registry and --model"),
        (["http://a:1", "--registry", REGISTRY, "--model", "m"], "not both"),
        (["--registry", REGISTRY], "--registry and --model go together"),
        (["http://a:1", "--model", "m"], "--registry and --model go together"),
        (["--registry", "http://h:1", "--model", "m"], "must start with redis://"),
        (["a:1"], "an instance is http(s)://host:port"),
    ],
)
def test_update_needs_instances_or_a_registry_and_a_model(args: list[str], said: str) -> None:
    result = CliRunner().invoke(main, ["update", *args, "--version", "2", "--source", "t:7100"])
    assert result.exit_code == 2, result.output
    assert said in result.output
