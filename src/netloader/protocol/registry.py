"""Which class decodes each control message type. Its own module because it names every
message class, so the modules defining them need not import one another."""

from __future__ import annotations

from netloader.errors import ProtocolError
from netloader.protocol.body import Message, decode_body
from netloader.protocol.frames import MsgType
from netloader.protocol.handshake import Auth, Bye, Error, Hello, Welcome
from netloader.protocol.out_of_band import (
    ChunkAddress,
    CudaIpcOffer,
    CudaIpcTensor,
    Done,
    NixlSetup,
    ProcessGroupSetup,
    SameHostAccept,
    SameHostDecline,
    SameHostOffer,
)
from netloader.protocol.transfer import End, Fetch, GetManifest, ManifestMessage

MESSAGES: dict[MsgType, type[Message]] = {
    m.TYPE: m
    for m in (
        Hello,
        Welcome,
        Auth,
        GetManifest,
        ManifestMessage,
        Fetch,
        End,
        ProcessGroupSetup,
        Done,
        SameHostOffer,
        SameHostAccept,
        SameHostDecline,
        ChunkAddress,
        NixlSetup,
        CudaIpcOffer,
        CudaIpcTensor,
        Error,
        Bye,
    )
}


def decode_message(kind: MsgType, body: bytes, max_containers: int | None) -> Message:
    """The typed control message of a frame of type `kind` (not DATA) with `body`, holding
    at most `max_containers` arrays/objects (None: the caller has bounded it already)."""
    if kind is MsgType.DATA:
        raise ProtocolError("DATA is not a control message")
    return MESSAGES[kind].decode(decode_body(body, max_containers))
