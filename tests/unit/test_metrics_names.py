"""The metrics follow Prometheus conventions, and failure labels stay a bounded set."""

from __future__ import annotations

from prometheus_client import generate_latest

from netloader import AuthenticationError, IntegrityError, ManifestMismatch, ServerBusy, metrics


def test_names_have_the_prefix_and_base_units() -> None:
    families = list(metrics.REGISTRY.collect())
    assert families and all(f.name.startswith("netloader_") for f in families)
    text = generate_latest(metrics.REGISTRY).decode()
    for family in families:
        if family.type == "counter":
            assert f"# TYPE {family.name}_total counter" in text
        if "duration" in family.name:
            assert family.name.endswith("_seconds")
    assert "netloader_sent_bytes_total" in text


def test_failure_kinds_are_a_fixed_few() -> None:
    assert metrics.kind(None) == "ok"
    assert metrics.kind(ServerBusy("full")) == "busy"
    assert metrics.kind(AuthenticationError("no")) == "auth"
    assert metrics.kind(ManifestMismatch("x")) == "mismatch"
    assert metrics.kind(IntegrityError("x")) == "integrity"
    assert metrics.kind(ValueError("anything at all")) == "error"
