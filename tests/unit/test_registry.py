"""Registry discovery without a network: URLs and their masking, record encoding (and
junk from an untrusted registry), choosing sources, wave upstreams among live members,
and the wave directory's liveness. tests/test_registry.py runs a real Redis server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from netloader import NetloaderConfig
from netloader.discovery.registry import (
    Group,
    Record,
    check_registry_url,
    mask_url,
    servers_of,
    upstreams,
)
from netloader.discovery.wave import Wave, listing
from netloader.errors import ConfigError

GROUP = Group("m", 1, 1, 0)


def record(address: str, **fields: object) -> Record:
    values: dict[str, object] = {"model": "m", "tp_size": 1, "pp_size": 1, "rank": 0}
    values.update(fields)
    return Record(address=address, **values)  # type: ignore[arg-type]


def test_urls_are_checked_and_passwords_never_shown() -> None:
    assert check_registry_url("redis://10.0.0.1:6379/0") == "redis://10.0.0.1:6379/0"
    url = "redis://:hunter2-long-password@10.0.0.1:6379/2"
    assert mask_url(url) == "redis://:***@10.0.0.1:6379/2"
    assert mask_url("redis://u:pw@h:1/0") == "redis://u:***@h:1/0"
    for bad in ("http://:pw-secret@h:1/0", "redis://:pw-secret@/0", "redis://:pw-secret@h:1/x"):
        with pytest.raises(ValueError) as caught:
            check_registry_url(bad)
        assert "pw-secret" not in str(caught.value)
    config = NetloaderConfig.from_dict({"REGISTRY": url})
    assert config.registry == url
    with pytest.raises(ConfigError, match="REGISTRY") as refused:
        NetloaderConfig.from_dict({"REGISTRY": "tcp://:pw-secret@h:1"})
    assert "pw-secret" not in str(refused.value)


def test_keys_follow_the_layout_and_patterns_match_names_literally() -> None:
    group = Group("org/llama-8b", 2, 1, 1)
    assert group.server_key("10.0.0.5:7001") == "netloader:org/llama-8b:2x1:rank1:10.0.0.5:7001"
    assert (
        group.member_key(3, "10.0.0.6:7001")
        == "netloader-wave:org/llama-8b:2x1:rank1:3:10.0.0.6:7001"
    )
    assert Group("a*[b]?").servers_pattern() == "netloader:a\\*\\[b\\]\\?:1x1:rank0:*"


def test_records_round_trip_and_junk_is_no_record() -> None:
    original = record("10.0.0.5:7000", transfers=3, since=1.5e9, layout="checkpoint")
    assert Record.from_json(original.to_json()) == original
    member = record("10.0.0.6:7000", position=4)
    assert Record.from_json(member.to_json()) == member
    assert "position" not in json.loads(original.to_json())
    good = json.loads(original.to_json())
    junk: list[bytes | str | None] = [
        None,
        b"not json",
        b"\xff\xfe",
        "[]",
        json.dumps({**good, "address": "no-port"}),
        json.dumps({**good, "tp_size": 0}),
        json.dumps({**good, "transfers": -1}),
        json.dumps({**good, "transfers": True}),
        json.dumps({**good, "rank": "0"}),
        json.dumps({**good, "position": -2}),
        json.dumps({k: v for k, v in good.items() if k != "model"}),
        json.dumps({**good, "layout": "x" * 5000}),
    ]
    for data in junk:
        assert Record.from_json(data) is None, data


def test_clients_try_the_least_loaded_first_and_only_their_group() -> None:
    records = [
        record("10.0.0.1:7000", transfers=2, since=10.0),
        record("10.0.0.2:7000", transfers=0, since=30.0),
        record("10.0.0.3:7000", transfers=0, since=20.0),
        record("10.0.0.4:7000", model="other"),
        record("10.0.0.5:7000", rank=1),
        record("10.0.0.6:7000", tp_size=2),
        record("10.0.0.7:7000", position=0),  # a wave member, not a server
        record("10.0.0.3:7000", transfers=5, since=1.0),  # the same address twice
    ]
    assert servers_of(records, GROUP) == ["10.0.0.3:7000", "10.0.0.2:7000", "10.0.0.1:7000"]


def test_wave_upstreams_skip_dead_members() -> None:
    def members(*positions: int) -> list[Record]:
        return [record(f"10.0.0.{p}:7000", position=p) for p in positions]

    assert upstreams(members(0, 1, 2), GROUP, 3, 1) == [
        "10.0.0.2:7000",
        "10.0.0.1:7000",
        "10.0.0.0:7000",
    ]
    assert upstreams(members(0, 2), GROUP, 3, 1) == ["10.0.0.2:7000", "10.0.0.0:7000"]  # 1 died
    assert upstreams(members(0, 1, 2, 4), GROUP, 3, 1)[0] == "10.0.0.2:7000"  # later: not upstream
    assert upstreams(members(0, 1, 2), GROUP, 6, 2) == ["10.0.0.2:7000", "10.0.0.0:7000"]
    assert upstreams(members(0, 1), GROUP, 6, 2) == ["10.0.0.0:7000"]  # parent 2 dead
    assert upstreams(members(), GROUP, 0, 1) == []


def test_wave_directory_records_go_stale_when_their_holder_is_gone(tmp_path: Path) -> None:
    (tmp_path / "seed-0.txt").write_text("10.0.0.100:7000\n")
    wave = Wave(tmp_path)
    positions = [wave.join(f"10.0.0.{i}:7000") for i in range(3)]
    assert wave.sources(2) == ["10.0.0.1:7000", "10.0.0.0:7000", "10.0.0.100:7000"]
    wave.release(positions[1])  # as if its process had died: the lock goes with it
    assert wave.member(1) is None
    assert wave.sources(2) == ["10.0.0.0:7000", "10.0.0.100:7000"]
    (tmp_path / "rank0" / "00007.txt").write_text("10.0.0.77:7000\n")  # held by nobody
    assert wave.members() == {0: "10.0.0.0:7000", 2: "10.0.0.2:7000"}
    assert [(e.role, e.position, e.address) for e in listing(tmp_path)] == [
        ("seed", None, "10.0.0.100:7000"),
        ("member", 0, "10.0.0.0:7000"),
        ("member", 2, "10.0.0.2:7000"),
    ]
    for position in positions:
        wave.leave(position)
    assert wave.members() == {}
