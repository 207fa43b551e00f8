"""Configuration: the seed fields and their semantics (README, "Configuration reference").
TLS fields, which need a certificate, are in tests/test_tls.py."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netloader import ConfigError, Endpoint, NetloaderConfig

SOURCE = [
    {"device_id": 0, "sources": ["10.0.0.1:4000", "[fd00::1]:4000"]},
    {"device_id": 1, "sources": []},
]


def test_full_config_from_dict() -> None:
    cfg = NetloaderConfig.load(
        {
            "SOURCE": SOURCE,
            "MODEL": "llama",
            "LISTEN_PORT": 5000,
            "INT8_CACHE": "DRAM",
            "INT8_CACHE_NAME": ["qkv", "o_proj"],
            "OUTPUT_PREFIX": "/tmp/nl_",
        },
        environ={},
    )
    assert cfg.sources_for(0) == (Endpoint("10.0.0.1", 4000), Endpoint("fd00::1", 4000))
    assert cfg.sources_for(1) == ()  # empty list: default loader
    assert cfg.sources_for(7) == ()  # no entry: default loader
    assert cfg.model == "llama" and cfg.int8_cache == "dram"
    assert cfg.int8_cache_name == ("qkv", "o_proj")
    assert str(cfg.output_file_for(3)) == "/tmp/nl_3.txt"
    assert cfg.listen_port_for(2) == 5002


def test_defaults() -> None:
    cfg = NetloaderConfig.load(None, environ={})
    assert cfg.listen_port_for(0) == 0  # unset: a free port, picked by binding port 0
    assert cfg.int8_cache == "no" and cfg.int8_cache_name is None and cfg.output_file_for(0) is None
    assert cfg.connect_timeout == 5.0 and cfg.stall_timeout == 10.0
    assert cfg.wave_dir is None  # no wave: pull from SOURCE, serve once loaded
    assert cfg.update_staging_bytes is None  # a live update stages what it changes
    assert (
        NetloaderConfig.load({"UPDATE_STAGING_BYTES": 1 << 30}, environ={}).update_staging_bytes
        == 1 << 30
    )


def test_json_string_and_environment() -> None:
    env = {"NETLOADER_CONFIG": json.dumps({"MODEL": "from-env", "LISTEN_PORT": 2000})}
    cfg = NetloaderConfig.load('{"MODEL": "explicit"}', environ=env)
    assert cfg.model == "explicit"  # explicit wins over the environment
    assert cfg.listen_port == 2000  # the environment fills in the rest
    assert NetloaderConfig.load("", environ={}) == NetloaderConfig()


@pytest.mark.parametrize(
    ("port", "rank", "expected"),
    [
        (1024, 0, 1024),
        (65535, 0, 65535),
        (65530, 5, 65535),
        (65530, 6, None),
        (1000, 0, None),
        (1000, 24, 1024),
        (0, 0, None),
        (-5, 0, None),
    ],
)
def test_listen_port_range_per_rank(
    port: int, rank: int, expected: int | None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = NetloaderConfig.load({"LISTEN_PORT": port}, environ={})
    with caplog.at_level(logging.WARNING):
        assert cfg.listen_port_for(rank) == expected
    if expected is None:
        assert f"rank {rank} opens no listener" in caplog.text


def test_config_file_source_wins_other_fields_explicit_win(tmp_path: Path) -> None:
    path = tmp_path / "nl.json"
    path.write_text(
        json.dumps(
            {
                "SOURCE": [{"device_id": 0, "sources": ["1.2.3.4:9000"]}],
                "MODEL": "file-model",
                "LISTEN_PORT": 7000,
                "OUTPUT_PREFIX": "/tmp/f_",
            }
        )
    )
    cfg = NetloaderConfig.load(
        {
            "CONFIG_FILE": str(path),
            "SOURCE": [{"device_id": 0, "sources": ["5.6.7.8:1"]}],
            "MODEL": "explicit-model",
        },
        environ={},
    )
    assert cfg.sources_for(0) == (Endpoint("1.2.3.4", 9000),)  # the file's SOURCE wins
    assert cfg.model == "explicit-model"  # explicit wins for other fields
    assert cfg.listen_port == 7000 and cfg.output_prefix == "/tmp/f_"  # file fills the rest


def test_config_file_without_source_keeps_explicit_source(tmp_path: Path) -> None:
    path = tmp_path / "nl.json"
    path.write_text(json.dumps({"MODEL": "m"}))
    cfg = NetloaderConfig.load({"CONFIG_FILE": str(path), "SOURCE": SOURCE}, environ={})
    assert cfg.sources_for(0)[0] == Endpoint("10.0.0.1", 4000)


@pytest.mark.parametrize(
    ("raw", "field", "text"),
    [
        ({"SOURCES": []}, "SOURCES", "unknown field"),
        ({"LISTEN_PORT": "8000"}, "LISTEN_PORT", "expected an integer, got str '8000'"),
        ({"LISTEN_PORT": True}, "LISTEN_PORT", "expected an integer"),
        ({"LISTEN_PORT": 80.5}, "LISTEN_PORT", "expected an integer"),
        ({"MODEL": 3}, "MODEL", "expected a non-empty string"),
        ({"MODEL": ""}, "MODEL", "expected a non-empty string"),
        ({"INT8_CACHE": "gpu"}, "INT8_CACHE", "expected one of no, dram, hbm"),
        ({"INT8_CACHE_NAME": [1]}, "INT8_CACHE_NAME", "list of non-empty strings"),
        ({"SOURCE": {"device_id": 0}}, "SOURCE", "expected a list"),
        ({"SOURCE": [["1.2.3.4:5"]]}, "SOURCE[0]", "expected an object"),
        ({"SOURCE": [{"sources": []}]}, "SOURCE[0]", "missing device_id"),
        ({"SOURCE": [{"device_id": "0", "sources": []}]}, "SOURCE[0].device_id", "integer"),
        ({"SOURCE": [{"device_id": -1, "sources": []}]}, "SOURCE[0].device_id", ">= 0"),
        ({"SOURCE": [{"device_id": 0}, {"device_id": 0}]}, "SOURCE[1]", "appears twice"),
        ({"SOURCE": [{"device_id": 0, "sources": "1.2.3.4:5"}]}, "SOURCE[0].sources", "list"),
        (
            {"SOURCE": [{"device_id": 0, "sources": ["1.2.3.4"]}]},
            "SOURCE[0].sources[0]",
            "host:port",
        ),
        ({"SOURCE": [{"device_id": 0, "sources": ["h:70000"]}]}, "SOURCE[0].sources[0]", "outside"),
        ({"SOURCE": [{"device_id": 0, "ip": "x"}]}, "SOURCE[0]", "unknown key 'ip'"),
        ({"STALL_TIMEOUT": 0}, "STALL_TIMEOUT", "seconds"),
        ({"TRANSPORT": "carrier-pigeon"}, "TRANSPORT", "expected one of"),
        ({"WAVE_DIR": ["/a", "/b"]}, "WAVE_DIR", "expected a non-empty string"),
        ({"CONFIG_FILE": "/nonexistent/x.json"}, "CONFIG_FILE", "cannot read"),
        ({"JOIN_WAVE": True}, "JOIN_WAVE", "needs REGISTRY, and no WAVE_DIR"),
        (
            {"JOIN_WAVE": True, "REGISTRY": "redis://h:6379/0", "WAVE_DIR": "/w"},
            "JOIN_WAVE",
            "needs REGISTRY, and no WAVE_DIR",
        ),
        ({"WAVE_FANOUT": -1}, "WAVE_FANOUT", "0 (all from the seeds) to 1024"),
        ({"DRAIN_TIMEOUT": 0}, "DRAIN_TIMEOUT", "seconds"),
        ({"UPDATE_STAGING_BYTES": 0}, "UPDATE_STAGING_BYTES", "positive integer"),
        ({"UPDATE_STAGING_BYTES": "1G"}, "UPDATE_STAGING_BYTES", "positive integer"),
    ],
)
def test_bad_fields_name_the_field(raw: dict[str, Any], field: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        NetloaderConfig.load(raw, environ={})
    assert info.value.field == field
    assert text in str(info.value)
    assert f"'{field}'" in str(info.value)


@pytest.mark.parametrize("text", ["{", "[1]", "null"])
def test_bad_json(text: str) -> None:
    with pytest.raises(ConfigError, match="JSON"):
        NetloaderConfig.load(text, environ={})
    with pytest.raises(ConfigError, match="NETLOADER_CONFIG"):
        NetloaderConfig.load(None, environ={"NETLOADER_CONFIG": text})


def test_config_file_with_bad_content(tmp_path: Path) -> None:
    path = tmp_path / "nl.json"
    path.write_text('{"LISTEN_PORT": "x"}')
    with pytest.raises(ConfigError, match="LISTEN_PORT"):
        NetloaderConfig.load({"CONFIG_FILE": str(path)}, environ={})
    path.write_text(json.dumps({"CONFIG_FILE": str(path)}))
    with pytest.raises(ConfigError, match="may not name another CONFIG_FILE"):
        NetloaderConfig.load({"CONFIG_FILE": str(path)}, environ={})


# ---- property-based: any input gives a config or a ConfigError ---------------------------

_FIELDS = sorted(
    [
        "SOURCE", "MODEL", "LISTEN_PORT", "INT8_CACHE", "INT8_CACHE_NAME", "OUTPUT_PREFIX",
        "LISTEN_HOST", "ADVERTISE_HOST", "TRANSPORT", "CONNECT_TIMEOUT", "STALL_TIMEOUT",
        "SECRET_FILE", "TLS_CERT", "TLS_KEY", "TLS_CA", "WAVE_DIR", "UNKNOWN",
    ]
)  # fmt: skip
_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["device_id", "sources", "x"]), inner, max_size=3)
    ),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=6))
def test_any_fields_give_a_config_or_a_config_error(raw: dict[str, Any]) -> None:
    try:
        config = NetloaderConfig.load(raw, environ={})
    except ConfigError as exc:
        assert exc.field.split("[")[0] in _FIELDS, exc  # names the field (and where in it)
        return
    for rank in range(3):
        config.sources_for(rank)
        config.listen_port_for(rank)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(text: str) -> None:
    with contextlib.suppress(ConfigError):
        NetloaderConfig.load(text, environ={"NETLOADER_CONFIG": text})


def test_a_draft_model_has_its_own_port_file_and_sources() -> None:
    cfg = NetloaderConfig.load(
        {
            "LISTEN_PORT": 7000,
            "OUTPUT_PREFIX": "/tmp/nl_",
            "SOURCE": [{"device_id": 1, "sources": ["10.0.0.1:7001", "10.0.0.2:60000"]}],
        },
        environ={},
    )
    assert cfg.listen_port_for(1) == 7001 and cfg.listen_port_for(1, draft=True) == 17001
    assert str(cfg.output_file_for(1, draft=True)) == "/tmp/nl_1.draft.txt"
    # The same hosts at the draft offset; one past 65535 has no draft twin.
    assert cfg.sources_for(1, draft=True) == (Endpoint("10.0.0.1", 17001),)
    assert (
        NetloaderConfig.load({"LISTEN_PORT": 60000}, environ={}).listen_port_for(0, draft=True)
        is None
    )


@pytest.mark.parametrize(("value", "expected"), [(True, True), ("false", False), ("TRUE", True)])
def test_share_compile_cache_is_an_explicit_boolean(value: object, expected: bool) -> None:
    assert NetloaderConfig().share_compile_cache is False
    assert NetloaderConfig.from_dict({"SHARE_COMPILE_CACHE": value}).share_compile_cache is expected
    with pytest.raises(ConfigError, match=r"SHARE_COMPILE_CACHE.*true or false"):
        NetloaderConfig.from_dict({"SHARE_COMPILE_CACHE": "yes"})


def test_metrics_port_is_one_per_rank() -> None:
    config = NetloaderConfig.from_dict({"METRICS_PORT": 9400, "LISTEN_HOST": "0.0.0.0"})
    assert config.metrics_endpoint_for(3) == Endpoint("0.0.0.0", 9403)
    assert NetloaderConfig().metrics_endpoint_for(0) is None
    assert NetloaderConfig.from_dict({"METRICS_PORT": 65535}).metrics_endpoint_for(1) is None


def test_a_registry_wave_and_its_drain() -> None:
    config = NetloaderConfig.load(
        {"REGISTRY": "redis://h:6379/0", "JOIN_WAVE": True, "WAVE_FANOUT": 2, "DRAIN_TIMEOUT": 7},
        environ={},
    )
    assert (config.join_wave, config.wave_fanout, config.timeouts.drain) == (True, 2, 7.0)
    assert NetloaderConfig.load({}, environ={}).timeouts.drain == 30.0
