"""Discovery through a Redis registry, for fleets with no filesystem shared between nodes.

A server that is serving keeps one record per model identity and rank alive under

    netloader:{model}:{tp}x{pp}:rank{r}:{address}           (SET ... EX ttl, renewed)

and a wave member, while it relays, one under

    netloader-wave:{model}:{tp}x{pp}:rank{r}:{position}:{address}

its position claimed with INCR on `netloader-wave:{model}:{tp}x{pp}:rank{r}`. A vLLM
instance with INSTANCE_URL keeps one record of the instance itself (its HTTP API, its
layout, rank 0's server, the version it holds) under

    netloader-instance:{model}:{url}

for `netloader update --registry`. A killed process stops renewing, so its records vanish
within the TTL and are never handed out.

The registry is a phone book, not a judge: anyone who can write to it can plant a record.
A record only says where to try; the client's identity check, the digests and the secret
decide what is accepted. Every call is bounded by the connect timeout, and a registry that
cannot be reached is a RegistryError (one log line for the caller, then its fallbacks),
never a hang.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any, Generic, TypeVar

from netloader.endpoint import parse_endpoint
from netloader.errors import NetloaderError

log = logging.getLogger(__name__)

DEFAULT_TTL = 6.0  # seconds a record outlives its last renewal
SERVER_PREFIX = "netloader"
WAVE_PREFIX = "netloader-wave"
INSTANCE_PREFIX = "netloader-instance"
MAX_RECORD_BYTES = 4096  # a record is a few hundred bytes; anything larger is planted junk
MAX_RECORDS = 10_000  # the most records one lookup reads
SCAN_BATCH = 1000

T = TypeVar("T")


class RegistryError(NetloaderError):
    """The registry could not be reached, or did not answer in time."""


# ---- URLs ---------------------------------------------------------------------------------


def check_registry_url(url: str) -> str:
    """`url` if it is `redis://[:password@]host:port/db` (port and db optional); else
    ValueError saying what is wrong, with any password masked."""
    parts = _split_url(url, "registry", ("redis", "rediss"))
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"registry URL {mask_url(url)!r}: the database must be a number")
    return url


def check_instance_url(url: str) -> str:
    """`url` if it is `http(s)://host:port` (a trailing slash allowed): a vLLM instance's
    HTTP API as published in the registry; else ValueError saying what is wrong. No
    credentials, path, query or fragment: the registry is readable by the whole fleet."""
    parts = _split_url(url, "instance", ("http", "https"))
    if parts.port is None:
        raise ValueError(f"instance URL {mask_url(url)!r} names no port: http(s)://host:port")
    if "@" in parts.netloc or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"instance URL {mask_url(url)!r} must be http(s)://host:port alone (no "
            "credentials, path, query or fragment)"
        )
    return url


def _split_url(url: str, kind: str, schemes: tuple[str, str]) -> urllib.parse.SplitResult:
    """`url`'s parts, if it parses (its port too), has one of `schemes` and names a host;
    else ValueError about this `kind` of URL, with any password masked."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError for a port that is no port)
    except ValueError as exc:
        raise ValueError(f"bad {kind} URL {mask_url(url)!r}: {exc}") from None
    if parts.scheme not in schemes:
        allowed = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"{kind} URL {mask_url(url)!r} must start with {allowed}")
    if not parts.hostname:
        raise ValueError(f"{kind} URL {mask_url(url)!r} names no host")
    return parts


def mask_url(url: str) -> str:
    """`url` with its password (if any) replaced by ***, fit for logs and messages."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# ---- records ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """Whose records go together: servers of one model identity and rank."""

    model: str
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0

    def _name(self, prefix: str) -> str:
        return f"{prefix}:{self.model}:{self.tp_size}x{self.pp_size}:rank{self.rank}"

    def server_key(self, address: str) -> str:
        return f"{self._name(SERVER_PREFIX)}:{address}"

    def servers_pattern(self) -> str:
        return f"{_glob_escape(self._name(SERVER_PREFIX))}:*"

    @property
    def counter_key(self) -> str:
        return self._name(WAVE_PREFIX)

    def member_key(self, position: int, address: str) -> str:
        return f"{self._name(WAVE_PREFIX)}:{position}:{address}"

    def members_pattern(self) -> str:
        return f"{_glob_escape(self._name(WAVE_PREFIX))}:*"


@dataclass(frozen=True)
class Record:
    """One live server (or, with `position`, a wave member) as the registry tells it."""

    model: str
    tp_size: int
    pp_size: int
    rank: int
    address: str
    transfers: int = 0  # transfers in progress when last renewed
    since: float = 0.0  # when it started serving (Unix time)
    layout: str = ""  # "checkpoint": a served checkpoint, which any layout can load
    position: int | None = None  # a wave member's claimed position
    version: str = ""  # the version of the weights it serves ("": unversioned)

    @property
    def group(self) -> Group:
        return Group(self.model, self.tp_size, self.pp_size, self.rank)

    @property
    def label(self) -> str:
        return self.address

    @property
    def key(self) -> str:
        if self.position is None:
            return self.group.server_key(self.address)
        return self.group.member_key(self.position, self.address)

    def to_json(self) -> str:
        fields = asdict(self)
        if self.position is None:
            del fields["position"]
        if not self.version:
            del fields["version"]
        return json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str | None) -> Record | None:
        """The record in `data`, or None for anything that is not a well-formed one (the
        registry is untrusted: junk is skipped, never an error)."""
        raw = _bounded_json(data)
        if raw is None:
            return None
        try:
            record = cls(
                model=_get(raw, "model", str),
                tp_size=_get(raw, "tp_size", int),
                pp_size=_get(raw, "pp_size", int),
                rank=_get(raw, "rank", int),
                address=_get(raw, "address", str),
                transfers=_get(raw, "transfers", int),
                since=float(_get(raw, "since", (int, float))),
                layout=_get(raw, "layout", str),
                position=None if raw.get("position") is None else _get(raw, "position", int),
                version=_get(raw, "version", str) if "version" in raw else "",
            )
            parse_endpoint(record.address)
        except (TypeError, ValueError):
            return None
        sizes_ok = min(record.tp_size, record.pp_size) >= 1 and record.rank >= 0
        if not sizes_ok or record.transfers < 0 or not math.isfinite(record.since):
            return None
        if record.position is not None and record.position < 0:
            return None
        return record


def _get(raw: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = raw.get(name)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(name)
    return value


@dataclass(frozen=True)
class InstanceRecord:
    """One live vLLM instance as the registry tells it: its HTTP API (`url`, where a trainer
    sends the weight-update requests), its layout, rank 0's netloader server (`address`,
    "" when rank 0 does not serve), and the version of the weights it holds now ("": not
    known, e.g. loaded from disk and not updated since)."""

    model: str
    url: str
    tp_size: int = 1
    pp_size: int = 1
    address: str = ""
    version: str = ""
    since: float = 0.0  # when it started serving (Unix time)

    @property
    def key(self) -> str:
        return instance_key(self.model, self.url)

    @property
    def label(self) -> str:
        return self.url

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, data: bytes | str | None) -> InstanceRecord | None:
        """The record in `data`, or None for anything that is not a well-formed one (junk
        from an untrusted registry is skipped, never an error)."""
        raw = _bounded_json(data)
        if raw is None:
            return None
        try:
            record = cls(
                model=_get(raw, "model", str),
                url=check_instance_url(_get(raw, "url", str)),
                tp_size=_get(raw, "tp_size", int),
                pp_size=_get(raw, "pp_size", int),
                address=_get(raw, "address", str),
                version=_get(raw, "version", str),
                since=float(_get(raw, "since", (int, float))),
            )
            if record.address:
                parse_endpoint(record.address)
        except (TypeError, ValueError):
            return None
        if not record.model or min(record.tp_size, record.pp_size) < 1:
            return None
        return record if math.isfinite(record.since) else None


def instance_key(model: str, url: str) -> str:
    return f"{INSTANCE_PREFIX}:{model}:{url}"


def instance_record(
    model: str, url: str, *, tp_size: int = 1, pp_size: int = 1, address: str = ""
) -> InstanceRecord:
    """A record for a vLLM instance starting to serve now (its version filled in by the
    heartbeat that keeps it)."""
    return InstanceRecord(model, url, tp_size, pp_size, address, since=time.time())


def _bounded_json(data: bytes | str | None) -> dict[str, Any] | None:
    """The JSON object in `data`, or None if it is missing, too large or not one."""
    if data is None or len(data) > MAX_RECORD_BYTES:
        return None
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def servers_of(records: Iterable[Record], group: Group) -> list[str]:
    """The addresses of `group`'s servers among `records`, least loaded first (then the
    longest serving): the order a client tries them in. Records of another group (a model
    name that only shares a key prefix, a planted key) and wave members are left out."""
    chosen = [r for r in records if r.position is None and r.group == group]
    chosen.sort(key=lambda r: (r.transfers, r.since, r.address))
    return _unique(r.address for r in chosen)


def upstreams(members: Iterable[Record], group: Group, position: int, fanout: int) -> list[str]:
    """Whom the wave member at `position` pulls from, among the live `members`: its parent
    in a tree of `fanout` (1: a chain), else the nearest live ancestor, then the rest of
    the live ancestors. Dead members have no record, so they are skipped without a
    connect attempt."""
    live: dict[int, list[str]] = {}
    for r in members:
        if r.position is not None and r.group == group and r.position < position:
            live.setdefault(r.position, []).append(r.address)
    chain: list[str] = []
    ancestor = position // fanout - 1
    while ancestor >= 0:
        chain.extend(sorted(live.get(ancestor, [])))
        ancestor = ancestor // fanout - 1
    return _unique(chain)


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


def _glob_escape(text: str) -> str:
    """`text` as a literal in a SCAN MATCH pattern."""
    return "".join("\\" + c if c in "\\*?[]^" else c for c in text)


# ---- the connection -----------------------------------------------------------------------


class Registry:
    """One Redis connection (a small pool) to the registry at `url`. Every call is bounded:
    socket connect and read timeouts of `timeout`, no retries, and the whole call, however
    many round trips it takes, answered within `timeout` or a RegistryError."""

    def __init__(self, url: str, *, timeout: float = 5.0, ttl: float = DEFAULT_TTL) -> None:
        import redis  # here, so that a node without a registry never needs the library
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        check_registry_url(url)
        self.label = mask_url(url)
        self.timeout = timeout
        self.ttl = ttl
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._redis = redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    def __repr__(self) -> str:
        return f"Registry({self.label})"

    def close(self) -> None:
        self._redis.close()

    # ---- servers ------------------------------------------------------------------------
    def publish(self, record: Record | InstanceRecord) -> None:
        """Write `record`, to expire after the TTL unless published again; a wave member's
        record also keeps its wave's position counter alive."""
        self._bounded(lambda: self._publish(record))

    def withdraw(self, record: Record | InstanceRecord) -> None:
        self._bounded(lambda: self._redis.delete(record.key))

    def servers(self, *groups: Group) -> list[str]:
        """Live servers of `groups`, group by group, each in the order to try them (see
        servers_of); one bounded call however many groups."""

        def read() -> list[str]:
            found: list[str] = []
            for group in groups:
                found.extend(servers_of(self._records(group.servers_pattern()), group))
            return _unique(found)

        return self._bounded(read)

    def records(self, pattern: str = f"{SERVER_PREFIX}:*") -> list[Record]:
        """The well-formed records whose keys match `pattern` (all servers by default)."""
        return self._bounded(lambda: self._records(pattern))

    # ---- vLLM instances -----------------------------------------------------------------
    def instances(self, model: str | None = None) -> list[InstanceRecord]:
        """The well-formed records of live vLLM instances (of `model`, when given), by model
        and URL."""
        if model is None:
            pattern = f"{INSTANCE_PREFIX}:*"
        else:  # the pattern also matches models named "{model}:...": the filter drops them
            pattern = f"{_glob_escape(instance_key(model, ''))}*"
        found = self._bounded(lambda: self._values(pattern))
        records = (InstanceRecord.from_json(v) for v in found)
        chosen = [r for r in records if r is not None and model in (None, r.model)]
        return sorted(chosen, key=lambda r: (r.model, r.url))

    # ---- waves --------------------------------------------------------------------------
    def join(self, group: Group, address: str, fanout: int | None) -> tuple[Record, list[str]]:
        """Join `group`'s wave as a member serving at `address`, in one bounded call: claim
        the next position atomically (INCR), publish the member's record, and return it
        with the sources, in order: its live upstream members (see `upstreams`; none when
        `fanout` is None), then the group's live servers."""

        def join() -> tuple[Record, list[str]]:
            pipe = self._redis.pipeline(transaction=True)
            pipe.incr(group.counter_key)
            pipe.expire(group.counter_key, self._ttl_s)
            position = int(pipe.execute()[0]) - 1
            record = server_record(group, address, position=position)
            self._publish(record)
            members = [] if fanout is None else self._records(group.members_pattern())
            upstream = [] if fanout is None else upstreams(members, group, position, fanout)
            seeds = servers_of(self._records(group.servers_pattern()), group)
            return record, _unique([*upstream, *seeds])

        return self._bounded(join)

    # ---- one round trip or a few, unbounded: call through _bounded ------------------------
    @property
    def _ttl_s(self) -> int:
        return max(math.ceil(self.ttl), 1)

    def _publish(self, record: Record | InstanceRecord) -> None:
        pipe = self._redis.pipeline(transaction=False)
        pipe.set(record.key, record.to_json(), px=max(int(self.ttl * 1000), 1))
        if isinstance(record, Record) and record.position is not None:
            pipe.expire(record.group.counter_key, self._ttl_s)  # lives while its wave does
        pipe.execute()

    def _records(self, pattern: str) -> list[Record]:
        found = (Record.from_json(v) for v in self._values(pattern))
        return [r for r in found if r is not None]

    def _values(self, pattern: str) -> list[Any]:
        """The values of the keys matching `pattern` (at most MAX_RECORDS of them)."""
        keys: list[Any] = []
        for key in self._redis.scan_iter(match=pattern, count=SCAN_BATCH):
            keys.append(key)
            if len(keys) >= MAX_RECORDS:
                break
        values: list[Any] = []
        for start in range(0, len(keys), SCAN_BATCH):
            values.extend(self._redis.mget(keys[start : start + SCAN_BATCH]))
        return values

    # ---- bounding -----------------------------------------------------------------------
    def _bounded(self, call: Callable[[], T]) -> T:
        """`call()`'s result within `timeout`, or RegistryError. The call runs in a daemon
        thread so that several round trips cannot add up past the timeout; the socket
        timeouts end that thread soon after."""
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(call())
            except BaseException as exc:
                error.append(exc)

        worker = threading.Thread(target=run, name="netloader-registry", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            raise RegistryError(f"registry {self.label} did not answer within {self.timeout} s")
        if error:
            exc = error[0]
            if isinstance(exc, self._errors):
                reason = str(exc).rstrip(".")
                raise RegistryError(f"registry {self.label} unreachable: {reason}") from exc
            raise exc
        return result[0]


R = TypeVar("R", Record, InstanceRecord)


class Heartbeat(Generic[R]):
    """Keeps a record alive in the registry from a background thread: publishes it once
    `ready()` says the server is serving, renews it (with `update`'s fresh fields, such as
    transfers in progress, or the version an instance holds) every third of the TTL, and
    withdraws it on `close()`. A registry that goes away is logged once, and the record is
    published again when it is back."""

    def __init__(
        self,
        registry: Registry,
        record: R,
        *,
        update: Callable[[R], R] = lambda r: r,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registry = registry
        self.record: R = record
        self._update: Callable[[R], R] = update
        self._ready = ready
        self._stop = threading.Event()
        self.published = threading.Event()  # set once the record is in the registry
        self._thread = threading.Thread(target=self._run, name="netloader-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._ready():  # e.g. digests still being computed: not serving yet
            if self._stop.wait(0.2):
                return
        failing = False
        while not self._stop.is_set():
            record = self._update(self.record)
            try:
                self.registry.publish(record)
            except Exception as exc:  # whatever goes wrong, the server keeps serving
                if not failing:
                    log.warning(
                        "netloader: cannot renew %s in %s (retrying): %s",
                        record.label,
                        self.registry.label,
                        exc,
                    )
                failing = True
            else:
                if failing:
                    log.warning(
                        "netloader: registered %s in %s again", record.label, self.registry.label
                    )
                failing = False
                self.published.set()
            self._stop.wait(self.registry.ttl / 3)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        """Stop renewing and remove the record (a killed process's record expires instead)."""
        self._stop.set()
        self._thread.join(timeout=self.registry.timeout + 1)
        if self.published.is_set():
            try:
                self.registry.withdraw(self._update(self.record))
            except NetloaderError as exc:
                log.warning("netloader: cannot deregister from %s: %s", self.registry.label, exc)
        self.registry.close()


def server_record(
    group: Group,
    address: str,
    *,
    layout: str = "",
    position: int | None = None,
    version: str = "",
) -> Record:
    """A record for a server (or wave member) starting now."""
    return Record(
        version=version,
        model=group.model,
        tp_size=group.tp_size,
        pp_size=group.pp_size,
        rank=group.rank,
        address=address,
        since=time.time(),
        layout=layout,
        position=position,
    )


def with_transfers(transfers: Callable[[], int]) -> Callable[[Record], Record]:
    """An update for Heartbeat that refreshes the record's transfers in progress."""
    return lambda record: replace(record, transfers=transfers())


def with_holding(
    version: Callable[[], str], address: Callable[[], str]
) -> Callable[[InstanceRecord], InstanceRecord]:
    """An update for Heartbeat that refreshes an instance's version and server address."""
    return lambda record: replace(record, version=version(), address=address())
