"""Configuration: the seed system's fields plus a few of our own (README, "Configuration
reference").

Sources, lowest priority first: the `NETLOADER_CONFIG` environment variable (JSON), the
dict or JSON string the caller passes (e.g. vLLM's `--model-loader-extra-config`), then
`CONFIG_FILE`: explicit values win over the file, except `SOURCE`, where the file wins.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from netloader import transports
from netloader.discovery.registry import check_instance_url, check_registry_url
from netloader.endpoint import Endpoint, parse_endpoint
from netloader.errors import ConfigError
from netloader.settings import MIN_SEND_RATE, Limits, Timeouts, resolve_secret
from netloader.transports import tls

log = logging.getLogger(__name__)

ENV_VAR = "NETLOADER_CONFIG"
MIN_PORT, MAX_PORT = 1024, 65535
# A speculative-decoding draft model is served beside its target: at LISTEN_PORT + rank +
# this offset (the upstream Netloader's convention), its address in a ".draft" file.
DRAFT_PORT_OFFSET = 10000
DRAFT_SUFFIX = ".draft"
CACHE_MODES = ("no", "dram", "hbm")

MAX_CONFIG_FILE_BYTES = 1 << 20  # a config file is small; this bounds /dev/zero and the like


@dataclass(frozen=True)
class RankSources:
    device_id: int
    sources: tuple[Endpoint, ...]


@dataclass(frozen=True)
class NetloaderConfig:
    # Seed fields.
    source: tuple[RankSources, ...] = ()
    model: str | None = None
    listen_port: int | None = None
    int8_cache: str = "no"
    int8_cache_name: tuple[str, ...] | None = None
    output_prefix: str | None = None
    config_file: str | None = None
    # Ours.
    listen_host: str = "127.0.0.1"
    advertise_host: str | None = None
    transport: str = "auto"
    connect_timeout: float = Timeouts.connect
    stall_timeout: float = Timeouts.stall
    secret_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    wave_dir: str | None = None
    registry: str | None = None
    instance_url: str | None = None
    join_wave: bool = False
    wave_fanout: int = 1
    drain_timeout: float = Timeouts.drain
    share_compile_cache: bool = False
    metrics_port: int | None = None
    send_rate: float | None = Limits.send_rate
    sender_nice: int = Limits.sender_nice
    update_staging_bytes: int | None = None
    _given: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        value: Mapping[str, Any] | str | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> NetloaderConfig:
        """Build the effective configuration from the environment, `value` and CONFIG_FILE."""
        environ = os.environ if environ is None else environ
        merged: dict[str, Any] = {}
        if environ.get(ENV_VAR):
            merged.update(_json_object(environ[ENV_VAR], f"environment variable {ENV_VAR}"))
        if isinstance(value, str):
            merged.update(_json_object(value, "config string") if value.strip() else {})
        elif value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError("<config>", f"expected a JSON object, got {type(value).__name__}")
            merged.update(value)
        config = cls.from_dict(merged)
        if config.config_file is not None:
            config = config._with_file(config.config_file)
        if config.join_wave and (config.registry is None or config.wave_dir is not None):
            raise ConfigError("JOIN_WAVE", "needs REGISTRY, and no WAVE_DIR")
        if config.instance_url is not None and config.registry is None:
            raise ConfigError("INSTANCE_URL", "needs REGISTRY, where the instance is published")
        return config

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> NetloaderConfig:
        """Validate one JSON object of fields (no file, no environment)."""
        unknown = sorted(set(raw) - set(_PARSERS))
        if unknown:
            known = ", ".join(sorted(_PARSERS))
            raise ConfigError(unknown[0], f"unknown field; known fields are {known}")
        kwargs = {_PARSERS[key][0]: _PARSERS[key][1](key, val) for key, val in raw.items()}
        return cls(**kwargs, _given=frozenset(kwargs))

    def _with_file(self, path: str) -> NetloaderConfig:
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError("CONFIG_FILE", f"cannot read {path!r}: {exc.strerror}") from exc
        if len(data) > MAX_CONFIG_FILE_BYTES:
            raise ConfigError("CONFIG_FILE", f"{path!r} is larger than {MAX_CONFIG_FILE_BYTES}")
        text = data.decode("utf-8", "replace")
        raw = _json_object(text, f"CONFIG_FILE {path!r}")
        if "CONFIG_FILE" in raw:
            raise ConfigError("CONFIG_FILE", f"{path!r} may not name another CONFIG_FILE")
        from_file = NetloaderConfig.from_dict(raw)
        # Fields given explicitly win over the file; SOURCE from the file wins over all.
        keep = {
            name for name in self._given if name != "source" or "source" not in from_file._given
        }
        updates = {name: getattr(self, name) for name in keep}
        return replace(from_file, **updates, _given=from_file._given | self._given)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(
            connect=self.connect_timeout, stall=self.stall_timeout, drain=self.drain_timeout
        )

    @property
    def limits(self) -> Limits:
        return Limits(send_rate=self.send_rate, sender_nice=self.sender_nice)

    def is_set(self, attribute: str) -> bool:
        """Whether a field was given (by any source) rather than left at its default."""
        return attribute in self._given

    # ---- per-rank lookups ---------------------------------------------------------------
    def sources_for(self, rank: int, *, draft: bool = False) -> tuple[Endpoint, ...]:
        """The sources configured for `rank`; empty means: use the default loader. For a
        speculative-decoding draft model: the same hosts, at DRAFT_PORT_OFFSET above."""
        for entry in self.source:
            if entry.device_id == rank:
                if not draft:
                    return entry.sources
                shifted = (Endpoint(e.host, e.port + DRAFT_PORT_OFFSET) for e in entry.sources)
                return tuple(e for e in shifted if e.port <= MAX_PORT)
        return ()

    def metrics_endpoint_for(self, rank: int) -> Endpoint | None:
        """Where rank's metrics are exposed: LISTEN_HOST, METRICS_PORT + rank (one port per
        worker, since each worker process counts its own); None when unset or out of range."""
        if self.metrics_port is None:
            return None
        port = self.metrics_port + rank
        if not MIN_PORT <= port <= MAX_PORT:
            log.warning("netloader: METRICS_PORT %d + %d is out of range", self.metrics_port, rank)
            return None
        return Endpoint(self.listen_host, port)

    def listen_port_for(self, rank: int, *, draft: bool = False) -> int | None:
        """Port for rank's listener: LISTEN_PORT + rank (+ DRAFT_PORT_OFFSET for a draft
        model), 0 (pick a free one) when unset, None when the sum is outside 1024-65535
        (that rank opens no listener)."""
        if self.listen_port is None:
            return 0
        offset = rank + (DRAFT_PORT_OFFSET if draft else 0)
        port = self.listen_port + offset
        if MIN_PORT <= port <= MAX_PORT:
            return port
        log.warning(
            "netloader: LISTEN_PORT %d + %d = %d is outside %d-%d; rank %d%s opens no listener",
            self.listen_port,
            offset,
            port,
            MIN_PORT,
            MAX_PORT,
            rank,
            " (draft)" if draft else "",
        )
        return None

    def output_file_for(self, rank: int, *, draft: bool = False) -> Path | None:
        """OUTPUT_PREFIX's file for `rank`: `{OUTPUT_PREFIX}{rank}.txt`, and
        `{OUTPUT_PREFIX}{rank}.draft.txt` for a speculative-decoding draft model."""
        if self.output_prefix is None:
            return None
        return Path(f"{self.output_prefix}{rank}{DRAFT_SUFFIX if draft else ''}.txt")

    def server_tls(self) -> ssl.SSLContext | None:
        """TLS for this instance's server: TLS_CERT and TLS_KEY, both or neither."""
        if (self.tls_cert is None) != (self.tls_key is None):
            missing = "TLS_KEY" if self.tls_key is None else "TLS_CERT"
            raise ConfigError(missing, "TLS_CERT and TLS_KEY go together")
        if self.tls_cert is None or self.tls_key is None:
            return None
        return tls.server_context(self.tls_cert, self.tls_key)

    def client_tls(self) -> ssl.SSLContext | None:
        """TLS for pulls: TLS_CA, the CA that signed the servers' certificates."""
        return None if self.tls_ca is None else tls.client_context(self.tls_ca)

    def authenticates_sources(self) -> bool:
        """Whether a source must prove the shared secret or a certificate from TLS_CA: what
        taking code from a peer (a compile cache) requires."""
        return resolve_secret(None, self.secret_file) is not None or self.tls_ca is not None


# ---- field parsers ---------------------------------------------------------------------


def _json_object(text: str, where: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("<config>", f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise ConfigError("<config>", f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(key, f"expected a non-empty string, got {_type_name(value)} {value!r}")
    return value


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"expected an integer, got {_type_name(value)} {value!r}")
    return value


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(key, f"expected true or false, got {_type_name(value)} {value!r}")


def _seconds(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
        raise ConfigError(key, f"expected a number of seconds in (0, 86400], got {value!r}")
    return float(value)


def _byte_count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, f"expected a number of bytes (a positive integer), got {value!r}")
    return value


def _fanout(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
        raise ConfigError(
            key, f"expected members each relays to, 0 (all from the seeds) to 1024, got {value!r}"
        )
    return value


def _send_rate(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= MIN_SEND_RATE:
        raise ConfigError(
            key, f"expected bytes per second, at least {MIN_SEND_RATE:.0f}, got {value!r}"
        )
    return float(value)


def _niceness(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 19:
        raise ConfigError(key, f"expected an integer from 0 to 19, got {value!r}")
    return value


def _choice(choices: tuple[str, ...]) -> Any:
    def parse(key: str, value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise ConfigError(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return parse


def _names(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(key, f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _source(key: str, value: Any) -> tuple[RankSources, ...]:
    if not isinstance(value, list):
        raise ConfigError(
            key,
            f'expected a list of {{"device_id": int, "sources": ["ip:port", ...]}}, got {value!r}',
        )
    entries: list[RankSources] = []
    for i, item in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(where, f"expected an object, got {_type_name(item)}")
        extra = set(item) - {"device_id", "sources"}
        if extra:
            raise ConfigError(
                where, f"unknown key {sorted(extra)[0]!r}; expected device_id, sources"
            )
        if "device_id" not in item:
            raise ConfigError(where, "missing device_id")
        device_id = _int(f"{where}.device_id", item["device_id"])
        if device_id < 0:
            raise ConfigError(f"{where}.device_id", f"must be >= 0, got {device_id}")
        if any(e.device_id == device_id for e in entries):
            raise ConfigError(where, f"device_id {device_id} appears twice")
        sources = item.get("sources", [])
        if not isinstance(sources, list):
            raise ConfigError(f"{where}.sources", f"expected a list of 'ip:port', got {sources!r}")
        parsed = []
        for j, text in enumerate(sources):
            try:
                parsed.append(parse_endpoint(text))
            except ValueError as exc:
                raise ConfigError(f"{where}.sources[{j}]", str(exc)) from exc
        entries.append(RankSources(device_id, tuple(parsed)))
    return tuple(entries)


def _registry(key: str, value: Any) -> str:
    try:
        return check_registry_url(_str(key, value))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _instance_url(key: str, value: Any) -> str:
    try:
        return check_instance_url(_str(key, value))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


# JSON field -> (dataclass attribute, parser)
_PARSERS: dict[str, tuple[str, Any]] = {
    "SOURCE": ("source", _source),
    "MODEL": ("model", _str),
    "LISTEN_PORT": ("listen_port", _int),
    "INT8_CACHE": ("int8_cache", _choice(CACHE_MODES)),
    "INT8_CACHE_NAME": ("int8_cache_name", _names),
    "OUTPUT_PREFIX": ("output_prefix", _str),
    "CONFIG_FILE": ("config_file", _str),
    "LISTEN_HOST": ("listen_host", _str),
    "ADVERTISE_HOST": ("advertise_host", _str),
    "TRANSPORT": ("transport", _choice(transports.names())),
    "CONNECT_TIMEOUT": ("connect_timeout", _seconds),
    "STALL_TIMEOUT": ("stall_timeout", _seconds),
    "SECRET_FILE": ("secret_file", _str),
    "TLS_CERT": ("tls_cert", _str),
    "TLS_KEY": ("tls_key", _str),
    "TLS_CA": ("tls_ca", _str),
    "WAVE_DIR": ("wave_dir", _str),
    "REGISTRY": ("registry", _registry),
    "INSTANCE_URL": ("instance_url", _instance_url),
    "JOIN_WAVE": ("join_wave", _bool),
    "WAVE_FANOUT": ("wave_fanout", _fanout),
    "DRAIN_TIMEOUT": ("drain_timeout", _seconds),
    "METRICS_PORT": ("metrics_port", _int),
    "SHARE_COMPILE_CACHE": ("share_compile_cache", _bool),
    "SEND_RATE": ("send_rate", _send_rate),
    "SENDER_NICE": ("sender_nice", _niceness),
    "UPDATE_STAGING_BYTES": ("update_staging_bytes", _byte_count),
}
