"""The netloader protocol, free of I/O: framing (`frames`), control bodies and their field
checks (`body`), the typed messages (`handshake`, `transfer`, `out_of_band`), the type ->
class table (`registry`), and the conversation's state machine with its authentication
(`session`)."""

from netloader.protocol.body import Message, decode_body
from netloader.protocol.frames import (
    DATA_PREFIX,
    HEADER,
    MAGIC,
    MAX_BODY,
    PROTOCOL_VERSION,
    TAG_BYTES,
    FrameHeader,
    MsgType,
    decode_data_prefix,
    decode_header,
    encode,
    encode_data_header,
)
from netloader.protocol.handshake import Auth, Bye, Error, ErrorCode, Hello, Welcome
from netloader.protocol.out_of_band import (
    ChunkAddress,
    CudaIpcOffer,
    CudaIpcStorage,
    CudaIpcTensor,
    Done,
    NixlSetup,
    ProcessGroupSetup,
    SameHostAccept,
    SameHostDecline,
    SameHostOffer,
)
from netloader.protocol.registry import decode_message
from netloader.protocol.session import (
    ClientSession,
    Phase,
    Role,
    ServerSession,
    Session,
    new_nonce,
    proof,
    proof_matches,
)
from netloader.protocol.transfer import Data, End, Fetch, GetManifest, ManifestMessage, Part

__all__ = [
    "DATA_PREFIX",
    "HEADER",
    "MAGIC",
    "MAX_BODY",
    "PROTOCOL_VERSION",
    "TAG_BYTES",
    "Auth",
    "Bye",
    "ChunkAddress",
    "ClientSession",
    "CudaIpcOffer",
    "CudaIpcStorage",
    "CudaIpcTensor",
    "Data",
    "Done",
    "End",
    "Error",
    "ErrorCode",
    "Fetch",
    "FrameHeader",
    "GetManifest",
    "Hello",
    "ManifestMessage",
    "Message",
    "MsgType",
    "NixlSetup",
    "Part",
    "Phase",
    "ProcessGroupSetup",
    "Role",
    "SameHostAccept",
    "SameHostDecline",
    "SameHostOffer",
    "ServerSession",
    "Session",
    "Welcome",
    "decode_body",
    "decode_data_prefix",
    "decode_header",
    "decode_message",
    "encode",
    "encode_data_header",
    "new_nonce",
    "proof",
    "proof_matches",
]
