"""Optional TLS: verified server certificates, clear errors when one side lacks TLS or
the certificate is not trusted, timeouts still bounded, the CLI and the config."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import netloader
from netloader import AuthenticationError, ConfigError, Identity, SourceUnavailable
from netloader.testing.certs import self_signed_certificate
from netloader.testing.models import blocks, same_bytes, transformer_like, write_checkpoint
from netloader.transports.tls import client_context, server_context
from support.servers import MakeProxy, StartCliServer, run_cli
from support.tensors import empty_like_set

MIB = 1 << 20
Cert = tuple[Path, Path]


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> Cert:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"), ["127.0.0.1"])


def test_pull_over_tls_with_secret_is_bit_identical(cert: Cert) -> None:
    expected = transformer_like()
    dest = empty_like_set(expected)
    with netloader.serve(
        expected, identity="m", secret="tls test secret, long enough", tls=server_context(*cert)
    ) as srv:
        report = netloader.load(
            dest,
            [srv.address],
            identity="m",
            secret="tls test secret, long enough",
            tls=client_context(cert[0]),
        )
    assert report.verified
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_client_without_tls_is_refused_and_server_keeps_serving(cert: Cert) -> None:
    expected = transformer_like()
    with netloader.serve(expected, identity="m", tls=server_context(*cert)) as srv:
        with pytest.raises(netloader.TransferError):
            netloader.load(empty_like_set(expected), [srv.address], identity="m")
        dest = empty_like_set(expected)
        netloader.load(dest, [srv.address], identity="m", tls=client_context(cert[0]))
    assert all(same_bytes(dest[n], t) for n, t in expected.items())


def test_tls_client_against_plain_server_says_so(cert: Cert) -> None:
    with (
        netloader.serve(transformer_like(), identity="m") as srv,
        pytest.raises(SourceUnavailable, match=r"TLS handshake with .* failed \(does it use TLS"),
    ):
        netloader.load(
            empty_like_set(transformer_like()),
            [srv.address],
            identity="m",
            tls=client_context(cert[0]),
        )


def test_untrusted_certificate_is_refused(cert: Cert, tmp_path: Path) -> None:
    other_cert, _ = self_signed_certificate(tmp_path, ["127.0.0.1"])
    with (
        netloader.serve(transformer_like(), identity="m", tls=server_context(*cert)) as srv,
        pytest.raises(AuthenticationError, match="certificate we cannot trust"),
    ):
        netloader.load(
            empty_like_set(transformer_like()),
            [srv.address],
            identity="m",
            tls=client_context(other_cert),
        )


def test_certificate_for_another_address_is_refused(tmp_path: Path) -> None:
    cert = self_signed_certificate(tmp_path, ["10.9.9.9"])
    with (
        netloader.serve(transformer_like(), identity="m", tls=server_context(*cert)) as srv,
        pytest.raises(AuthenticationError, match="IP address mismatch"),
    ):
        netloader.load(
            empty_like_set(transformer_like()),
            [srv.address],
            identity="m",
            tls=client_context(cert[0]),
        )


def test_stall_under_tls_times_out(cert: Cert, proxy: MakeProxy) -> None:
    expected = blocks()
    with netloader.serve(expected, identity="m", tls=server_context(*cert)) as srv:
        frozen = proxy(str(srv.address), freeze_after=8 * MIB)
        start = time.monotonic()
        with pytest.raises(netloader.TransferTimeout):
            client = netloader.Client(
                [frozen.address],
                timeouts=netloader.Timeouts(stall=1.5),
                tls=client_context(cert[0]),
            )
            client.load_into(empty_like_set(expected), Identity("m"))
        assert time.monotonic() - start < 10


def test_tls_refuses_transports_it_cannot_cover(cert: Cert) -> None:
    with pytest.raises(ValueError, match="TLS cannot cover the gloo transport"):
        netloader.Client(["127.0.0.1:1"], transport="gloo", tls=client_context(cert[0]))


def test_config_tls_fields(cert: Cert) -> None:
    config = netloader.NetloaderConfig.load({"TLS_CERT": str(cert[0])}, environ={})
    with pytest.raises(ConfigError, match="TLS_KEY"):
        config.server_tls()
    full = netloader.NetloaderConfig.load(
        {"TLS_CERT": str(cert[0]), "TLS_KEY": str(cert[1]), "TLS_CA": str(cert[0])}, environ={}
    )
    assert full.server_tls() is not None and full.client_tls() is not None
    with pytest.raises(ConfigError, match="TLS_CA"):
        netloader.NetloaderConfig.load({"TLS_CA": "/nonexistent"}, environ={}).client_tls()


def test_cli_serve_and_pull_over_tls(
    cert: Cert, tmp_path: Path, cli_server: StartCliServer
) -> None:
    expected = blocks(8)
    ckpt = write_checkpoint(tmp_path / "ckpt", expected).parent
    server = cli_server(ckpt, "--tls-cert", str(cert[0]), "--tls-key", str(cert[1]))
    out = str(tmp_path / "out")
    done = run_cli("pull", server.address, "--out", out, "--tls-ca", str(cert[0]))
    plain = run_cli("inspect", server.address, "--connect-timeout", "2")
    assert done.returncode == 0, done.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert all(same_bytes(got[n], t) for n, t in expected.items())
    assert plain.returncode == 1 and "netloader: error:" in plain.stderr
