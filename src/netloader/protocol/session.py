"""The conversation as a pure state machine (in the spirit of h11's `_state.py`): which
message each side may send in each phase, and the mutual authentication, with no I/O.

    client                                  server
    HELLO{protocol, nonce}          ->
                                    <-      WELCOME{protocol, auth, nonce, proof}
    AUTH{proof}                     ->      (only when the server requires a secret)
    GET_MANIFEST                    ->
                                    <-      MANIFEST
    FETCH{transport, chunks}        ->
                                    <-      DATA ... END          (bytes in band)
                                    <-      GLOO{port}  ... DONE  (bytes on a process group)
                                    <-      CUDA_IPC_OFFER; SAME_HOST_ACCEPT ->
                                            CUDA_IPC_TENSOR/CHUNK_ADDRESS ... END ... DONE
                                            (bytes copied GPU to GPU by the client)
                               DONE ->
    BYE                             ->
    either side may send ERROR instead of what is expected, and close.

A `ClientSession` and a `ServerSession` each track the phase of one connection. `send`
turns a message into bytes, refusing one its side may not send now; the receiving side
checks a frame's header against the phase *before* reading its body, so a peer cannot make
us allocate or parse anything the phase does not allow (before authentication, only the
handshake's small messages). `receive_data` / `next_event` parse a byte stream in memory,
which is how the sessions are tested: bytes piped between a client and a server session.
The socket layer reads headers and DATA bodies itself and uses `check_header` /
`receive_body`.

Authentication: HMAC-SHA256 over both nonces, bound to the prover's role, so a proof
cannot be reflected back at its sender. The server proves first (in WELCOME), the client
second (in AUTH). Then both derive a session key from the secret and both nonces, and
every control frame after the handshake carries a tag: HMAC-SHA256 under that key over
the sender's role, a per-direction sequence number, the type and the body. A relay in the
middle that does not know the secret can pass the handshake through, but it can neither
forge nor reorder a message after it: it can only pass the genuine manifest on (whose
digests then protect the data) or break the connection. DATA frames carry no tag: their
bytes are checked against the manifest's digests.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from enum import Enum, auto

from netloader.errors import AuthenticationError, ProtocolError, VersionMismatch
from netloader.protocol.body import MAX_CONTAINERS, NONCE_BYTES, Message, containers_within
from netloader.protocol.frames import (
    DATA_PREFIX,
    HEADER,
    MAGIC,
    MAX_BODY,
    PROTOCOL_VERSION,
    SMALL_BODY,
    TAG_BYTES,
    FrameHeader,
    MsgType,
    decode_data_prefix,
    decode_header,
    encode_data_header,
)
from netloader.protocol.handshake import Auth, Hello, Welcome
from netloader.protocol.registry import decode_message
from netloader.protocol.transfer import Data


class Role(Enum):
    CLIENT = "client"
    SERVER = "server"

    @property
    def other(self) -> Role:
        return Role.SERVER if self is Role.CLIENT else Role.CLIENT


class Phase(Enum):
    START = auto()  # the client is to say HELLO
    WELCOMING = auto()  # the server is to answer WELCOME
    AUTHENTICATING = auto()  # the client is to send AUTH
    READY = auto()  # the client asks: GET_MANIFEST, FETCH or BYE
    MANIFEST = auto()  # the server is to send its manifest
    TRANSFER = auto()  # the server sends DATA... END, or sets up a process group
    OUT_OF_BAND = auto()  # bytes move elsewhere; the client confirms with DONE
    SAME_HOST_OFFERED = auto()  # the client is to accept or decline reading the server's memory
    REMOTE_READ = auto()  # the server names chunks' addresses for the client to read, then END
    CUDA_IPC_OFFERED = auto()  # the client is to accept or decline copying from the server's GPU
    CUDA_IPC_READ = auto()  # the server exports tensors and names chunks' offsets, then END
    CLOSED = auto()


C, S = Role.CLIENT, Role.SERVER
# (phase, sender, message type) -> next phase. Anything else is a protocol violation.
TRANSITIONS: dict[tuple[Phase, Role, MsgType], Phase] = {
    (Phase.START, C, MsgType.HELLO): Phase.WELCOMING,
    (Phase.WELCOMING, S, MsgType.WELCOME): Phase.READY,  # AUTHENTICATING with a secret
    (Phase.AUTHENTICATING, C, MsgType.AUTH): Phase.READY,
    (Phase.READY, C, MsgType.GET_MANIFEST): Phase.MANIFEST,
    (Phase.MANIFEST, S, MsgType.MANIFEST): Phase.READY,
    (Phase.READY, C, MsgType.FETCH): Phase.TRANSFER,
    (Phase.TRANSFER, S, MsgType.DATA): Phase.TRANSFER,
    (Phase.TRANSFER, S, MsgType.END): Phase.READY,
    (Phase.TRANSFER, S, MsgType.GLOO): Phase.OUT_OF_BAND,
    (Phase.OUT_OF_BAND, C, MsgType.DONE): Phase.READY,
    (Phase.TRANSFER, S, MsgType.SAME_HOST_OFFER): Phase.SAME_HOST_OFFERED,
    (Phase.SAME_HOST_OFFERED, C, MsgType.SAME_HOST_DECLINE): Phase.TRANSFER,  # DATA frames
    (Phase.SAME_HOST_OFFERED, C, MsgType.SAME_HOST_ACCEPT): Phase.REMOTE_READ,
    (Phase.TRANSFER, S, MsgType.NIXL_SETUP): Phase.REMOTE_READ,
    (Phase.REMOTE_READ, S, MsgType.CHUNK_ADDRESS): Phase.REMOTE_READ,
    (Phase.REMOTE_READ, S, MsgType.END): Phase.OUT_OF_BAND,
    (Phase.TRANSFER, S, MsgType.CUDA_IPC_OFFER): Phase.CUDA_IPC_OFFERED,
    (Phase.CUDA_IPC_OFFERED, C, MsgType.SAME_HOST_DECLINE): Phase.TRANSFER,  # DATA frames
    (Phase.CUDA_IPC_OFFERED, C, MsgType.SAME_HOST_ACCEPT): Phase.CUDA_IPC_READ,
    (Phase.CUDA_IPC_READ, S, MsgType.CUDA_IPC_TENSOR): Phase.CUDA_IPC_READ,
    (Phase.CUDA_IPC_READ, S, MsgType.CHUNK_ADDRESS): Phase.CUDA_IPC_READ,
    (Phase.CUDA_IPC_READ, S, MsgType.END): Phase.OUT_OF_BAND,
    (Phase.READY, C, MsgType.BYE): Phase.CLOSED,
}
HANDSHAKE = frozenset({Phase.START, Phase.WELCOMING, Phase.AUTHENTICATING})


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(secret: bytes, role: Role, first: bytes, second: bytes) -> str:
    """`role`'s proof of knowing `secret`: HMAC-SHA256 over the role and both nonces (the
    verifier's first)."""
    return hmac.new(secret, role.value.encode() + first + second, hashlib.sha256).hexdigest()


def proof_matches(secret: bytes, role: Role, first: bytes, second: bytes, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(proof(secret, role, first, second), given)


def session_key(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(
        secret, b"netloader session" + client_nonce + server_nonce, hashlib.sha256
    ).digest()


class Session:
    """One side of one connection: the phase, and the checks on each message."""

    role: Role

    def __init__(self, secret: bytes | None, peer: str = "peer") -> None:
        self.secret = secret
        self.peer = peer
        self.phase = Phase.START
        self._buffer = bytearray()
        self._key: bytes | None = None  # once authenticated: every control frame is tagged
        # What the peer may send, tightened once the model is known (`expect_*`).
        self.max_body = dict(MAX_BODY)
        self.max_containers = dict(MAX_CONTAINERS)
        self.expected_tensors: int | None = None
        self._sequence = {Role.CLIENT: 0, Role.SERVER: 0}

    @property
    def keyed(self) -> bool:
        return self._key is not None

    def _tag(self, sender: Role, kind: MsgType, body: bytes) -> bytes:
        assert self._key is not None
        number = self._sequence[sender]
        self._sequence[sender] = number + 1
        mac = hmac.new(self._key, sender.value.encode(), hashlib.sha256)
        mac.update(number.to_bytes(8, "big") + bytes([kind]) + body)
        return mac.digest()

    # ---- transitions --------------------------------------------------------------------
    def _advance(self, sender: Role, kind: MsgType) -> None:
        if kind is MsgType.ERROR:
            self.phase = Phase.CLOSED
            return
        following = TRANSITIONS.get((self.phase, sender, kind))
        if following is None:
            raise ProtocolError(self._unexpected(sender, kind))
        if following is Phase.READY and kind is MsgType.WELCOME and self.secret is not None:
            following = Phase.AUTHENTICATING
        self.phase = following

    def _unexpected(self, sender: Role, kind: MsgType) -> str:
        allowed = [t.name for (ph, who, t) in TRANSITIONS if ph is self.phase and who is sender]
        expected = "/".join(allowed) or "nothing"
        who = self.peer if sender is not self.role else f"{self.role.value} (us)"
        return f"{who} sent {kind.name} in phase {self.phase.name.lower()}, expected {expected}"

    def expects(self, kind: MsgType) -> bool:
        """Whether the peer may send `kind` now."""
        return kind is MsgType.ERROR or (self.phase, self.role.other, kind) in TRANSITIONS

    # ---- sending ------------------------------------------------------------------------
    def send(self, message: Message | Data) -> bytes:
        """The bytes of `message`, if this side may send it now (tagged once keyed)."""
        self._advance(self.role, message.TYPE)
        frame = message.encode()
        if self._key is None or message.TYPE is MsgType.DATA:
            return frame
        body = frame[HEADER.size :]
        tag = self._tag(self.role, message.TYPE, body)
        return HEADER.pack(MAGIC, message.TYPE, len(body) + TAG_BYTES) + body + tag

    def send_data_header(self, chunk: int, length: int) -> bytes:
        """The header of a DATA frame whose `length` raw bytes the caller sends itself."""
        self._advance(self.role, MsgType.DATA)
        return encode_data_header(chunk, length)

    # ---- receiving ----------------------------------------------------------------------
    def check_header(self, header: FrameHeader) -> None:
        """Refuse a frame the phase does not allow, before its body is read. During the
        handshake, every body is small (whatever the type's own bound)."""
        if not self.expects(header.type):
            raise ProtocolError(self._unexpected(self.role.other, header.type))
        if self.phase in HANDSHAKE and header.length > SMALL_BODY:
            raise ProtocolError(
                f"{self.peer} sent a {header.length}-byte {header.type.name} during the handshake"
            )
        bound = self.max_body[header.type] + (TAG_BYTES if self._key is not None else 0)
        if header.length > bound:
            raise ProtocolError(
                f"{self.peer} sent a {header.length}-byte {header.type.name}; at most {bound} "
                "expected here"
            )

    def expect_manifest(self, tensors: int) -> None:
        """The peer's manifest should list `tensors` tensors: bound its structure to that,
        with room for another model several times larger, so that a mismatch is still
        reported as one, tensor by tensor."""
        self.expected_tensors = tensors
        self.max_containers[MsgType.MANIFEST] = 4 + 2 * max(4 * tensors, 4096)

    def expect_fetches(self, chunks: int) -> None:
        """The model has `chunks` chunks: bound a FETCH to naming each at most once."""
        self.max_containers[MsgType.FETCH] = 2
        self.max_body[MsgType.FETCH] = min(MAX_BODY[MsgType.FETCH], 64 + 12 * chunks)

    def receive_body(self, header: FrameHeader, body: bytes) -> Message:
        """The typed control message of a checked header; an ERROR frame is returned as an
        `Error` (the phase becomes CLOSED)."""
        if self._key is not None:
            body, tag = body[:-TAG_BYTES], body[-TAG_BYTES:]
            expected = self._tag(self.role.other, header.type, body)
            if len(tag) != TAG_BYTES or not hmac.compare_digest(tag, expected):
                self.phase = Phase.CLOSED
                raise AuthenticationError(
                    f"a {header.type.name} from {self.peer} failed its session check: "
                    "tampered with, or sent by a relay that does not know the secret",
                    source=self.peer,
                )
        limit = self.max_containers[header.type]
        if not containers_within(body, limit):  # counted once, here, before parsing
            if header.type is MsgType.MANIFEST and self.expected_tensors is not None:
                raise ProtocolError(
                    f"{self.peer}'s manifest holds more than {limit} arrays/objects: far "
                    f"more tensors than the {self.expected_tensors} expected (another model?)"
                )
            raise ProtocolError(
                f"{self.peer}'s {header.type.name} holds more than {limit} arrays/objects"
            )
        message = decode_message(header.type, body, max_containers=None)
        self._advance(self.role.other, header.type)
        self._received(message)
        return message

    def data_received(self) -> None:
        """A DATA frame was read (by the socket layer, straight into memory)."""
        self._advance(self.role.other, MsgType.DATA)

    def _received(self, message: Message) -> None:
        """The handshake's checks on a received message (subclasses)."""

    # ---- in memory (h11 style) ----------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_event(self) -> Message | Data | None:
        """The next complete message from the buffered bytes; None until one is complete."""
        if len(self._buffer) < HEADER.size:
            return None
        header = decode_header(bytes(self._buffer[: HEADER.size]))
        self.check_header(header)
        end = HEADER.size + header.length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        if header.type is MsgType.DATA:
            chunk = decode_data_prefix(body[: DATA_PREFIX.size])
            self.data_received()
            return Data(chunk, body[DATA_PREFIX.size :])
        return self.receive_body(header, body)


class ClientSession(Session):
    """The client's side: says HELLO, checks the server's proof, proves itself."""

    role = Role.CLIENT

    def __init__(self, secret: bytes | None, peer: str = "server") -> None:
        super().__init__(secret, peer)
        self.nonce = new_nonce()
        self._server_nonce = b""

    def hello(self) -> bytes:
        return self.send(Hello(PROTOCOL_VERSION, self.nonce))

    def _received(self, message: Message) -> None:
        if isinstance(message, Welcome):
            self._check_welcome(message)

    def _check_welcome(self, welcome: Welcome) -> None:
        """Raises VersionMismatch or AuthenticationError."""
        if welcome.protocol != PROTOCOL_VERSION:
            self.phase = Phase.CLOSED
            raise VersionMismatch(
                f"{self.peer} speaks protocol {welcome.protocol}, we speak {PROTOCOL_VERSION}",
                source=self.peer,
            )
        if welcome.auth and self.secret is None:
            self.phase = Phase.CLOSED
            raise AuthenticationError(
                f"authentication: {self.peer} requires a secret and none is configured",
                source=self.peer,
            )
        if self.secret is not None and (
            not welcome.auth
            or not proof_matches(self.secret, Role.SERVER, self.nonce, welcome.nonce, welcome.proof)
        ):
            self.phase = Phase.CLOSED
            raise AuthenticationError(
                f"authentication: {self.peer} could not prove it knows the shared secret",
                source=self.peer,
            )
        self._server_nonce = welcome.nonce

    def auth(self) -> bytes | None:
        """After a good WELCOME: the AUTH frame to send when we hold a secret, else None."""
        if self.secret is None or self.phase is not Phase.AUTHENTICATING:
            return None
        frame = self.send(Auth(proof(self.secret, Role.CLIENT, self._server_nonce, self.nonce)))
        self._key = session_key(self.secret, self.nonce, self._server_nonce)
        return frame


class ServerSession(Session):
    """The server's side: answers HELLO with its proof, then checks the client's."""

    role = Role.SERVER

    def __init__(self, secret: bytes | None, peer: str = "client") -> None:
        super().__init__(secret, peer)
        self.nonce = new_nonce()
        self._client_nonce = b""

    def welcome(self, hello: Hello) -> bytes:
        """WELCOME for this HELLO. Raises VersionMismatch (answer with an ERROR)."""
        if hello.protocol != PROTOCOL_VERSION:
            raise VersionMismatch(
                f"server speaks protocol {PROTOCOL_VERSION}, client {hello.protocol}",
                source=self.peer,
            )
        self._client_nonce = hello.nonce
        server_proof = (
            None
            if self.secret is None
            else proof(self.secret, Role.SERVER, hello.nonce, self.nonce)
        )
        return self.send(
            Welcome(PROTOCOL_VERSION, self.secret is not None, self.nonce, server_proof)
        )

    def _received(self, message: Message) -> None:
        if isinstance(message, Auth):
            self._verify(message)

    def _verify(self, auth: Auth) -> None:
        """AuthenticationError unless the client proved it knows the secret."""
        assert self.secret is not None  # AUTH is only expected when we hold one
        if not proof_matches(self.secret, Role.CLIENT, self.nonce, self._client_nonce, auth.proof):
            self.phase = Phase.CLOSED
            raise AuthenticationError("authentication failed", source=self.peer)
        self._key = session_key(self.secret, self._client_nonce, self.nonce)


__all__ = [
    "ClientSession",
    "Phase",
    "Role",
    "ServerSession",
    "Session",
    "new_nonce",
    "proof",
    "proof_matches",
]
