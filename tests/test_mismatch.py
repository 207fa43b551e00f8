"""Anything that differs is refused, clearly, before a single tensor byte moves."""

from __future__ import annotations

import socket

import pytest
import torch

from netloader import Client, Identity, ManifestMismatch, VersionMismatch
from netloader import protocol as p
from netloader.protocol import PROTOCOL_VERSION
from netloader.testing.models import transformer_like
from netloader.testing.processes import ServerProcess
from support.servers import FakeServer, StartServer
from support.tensors import SENTINEL, empty_like_set, untouched


def refuse(server: ServerProcess, dest: dict[str, torch.Tensor], identity: Identity) -> str:
    with pytest.raises(ManifestMismatch) as info:
        Client([server.address]).load_into(dest, identity)
    assert untouched(dest), "tensor bytes moved despite the mismatch"
    assert info.value.completed == frozenset()
    assert "sent " not in server.log_text()
    return str(info.value)


@pytest.fixture
def server(start_server: StartServer) -> ServerProcess:
    return start_server("transformer_like", "--model", "llama", "--tp-size", "2", "--tp-rank", "1")


IDENT = Identity("llama", tp_size=2, tp_rank=1)


def test_model_name(server: ServerProcess) -> None:
    message = refuse(server, empty_like_set(transformer_like()), Identity("mistral", 2, 1))
    assert "model: expected 'mistral', server has 'llama'" in message


@pytest.mark.parametrize(
    ("identity", "text"),
    [
        (Identity("llama", 1, 0), "tp_size: expected 1, server has 2"),
        (Identity("llama", 2, 0), "tp_rank: expected 0, server has 1"),
        (Identity("llama", 2, 1, pp_size=2), "pp_size: expected 2, server has 1"),
        (Identity("llama", 2, 1, attributes={"dtype": "bf16"}), "attribute dtype"),
    ],
)
def test_parallel_layout_and_attributes(
    server: ServerProcess, identity: Identity, text: str
) -> None:
    assert text in refuse(server, empty_like_set(transformer_like()), identity)


def test_missing_and_extra_tensor_names(server: ServerProcess) -> None:
    dest = empty_like_set(transformer_like())
    dest["lm_head.weight"] = dest.pop("embed.weight")
    message = refuse(server, dest, IDENT)
    assert "tensor 'lm_head.weight' missing on server" in message
    assert "tensor 'embed.weight' on server only" in message


def test_shape(server: ServerProcess) -> None:
    dest = empty_like_set(transformer_like())
    dest["layers.0.norm"] = (
        torch.full((255,), 0, dtype=torch.float32)
        .view(torch.uint8)
        .fill_(SENTINEL)
        .view(torch.float32)
    )
    assert "tensor 'layers.0.norm': expected float32[255], server has float32[256]" in refuse(
        server, dest, IDENT
    )


def test_dtype(server: ServerProcess) -> None:
    dest = empty_like_set(transformer_like())
    dest["layers.1.norm"] = empty_like_set({"x": torch.zeros(256, dtype=torch.float16)})["x"]
    assert "expected float16[256], server has float32[256]" in refuse(server, dest, IDENT)


def test_server_refuses_other_protocol_version(server: ServerProcess) -> None:
    host, port = server.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(p.Hello(PROTOCOL_VERSION + 1, p.new_nonce()).encode())
        header = p.decode_header(sock.recv(p.HEADER.size, socket.MSG_WAITALL))
        body = p.decode_body(sock.recv(header.length, socket.MSG_WAITALL))
    assert header.type is p.MsgType.ERROR
    assert body["code"] == "version" and f"client {PROTOCOL_VERSION + 1}" in body["message"]


def test_client_refuses_server_of_other_protocol_version(fake_server: FakeServer) -> None:
    """A fake server that answers WELCOME with another version: VersionMismatch."""
    address = fake_server(p.Welcome(PROTOCOL_VERSION + 1, False, p.new_nonce(), None).encode())
    dest = empty_like_set(transformer_like())
    with pytest.raises(VersionMismatch, match=f"speaks protocol {PROTOCOL_VERSION + 1}"):
        Client([address]).load_into(dest, IDENT)
    assert untouched(dest)
