"""The server's send-rate cap as a token bucket, on a fake clock; and its settings."""

from __future__ import annotations

import pytest

from netloader import ConfigError, NetloaderConfig
from netloader.errors import UsageError
from netloader.server import pacing
from netloader.settings import Limits

MB = 1_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pacing.time, "monotonic", fake.monotonic)
    monkeypatch.setattr(pacing.time, "sleep", fake.sleep)
    return fake


def test_bytes_go_at_the_rate_after_one_burst(clock: FakeClock) -> None:
    pacer = pacing.Pacer(100 * MB)  # bursts of 10 MB
    clock.now += 60  # idle for a minute: the credit is still one burst, not more
    started = clock.now
    for _ in range(20):
        pacer.take(5 * MB)
    assert clock.now - started == pytest.approx((100 - 10) / 100)


def test_transfers_share_one_rate(clock: FakeClock) -> None:
    pacer = pacing.Pacer(10 * MB)
    started = clock.now
    for _ in range(10):  # two transfers interleaving their chunks
        pacer.take(MB)
        pacer.take(MB)
    assert clock.now - started == pytest.approx((20 - 1) / 10)


def test_no_rate_never_waits(clock: FakeClock) -> None:
    pacer = pacing.Pacer(None)
    for _ in range(100):
        pacer.take(1 << 30)
    assert clock.slept == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("SEND_RATE", 1000), ("SEND_RATE", True), ("SEND_RATE", "fast"), ("SENDER_NICE", 20)],
)
def test_bad_pacing_settings_are_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        NetloaderConfig.from_dict({field: value})


def test_pacing_settings_reach_the_limits() -> None:
    config = NetloaderConfig.from_dict({"SEND_RATE": 500e6, "SENDER_NICE": 5})
    assert config.limits == Limits(send_rate=500e6, sender_nice=5)
    assert NetloaderConfig.from_dict({}).limits == Limits()
    with pytest.raises(UsageError, match="send_rate"):
        Limits(send_rate=1.0)
