"""The messages that move a model in band: which part the client wants (GET_MANIFEST),
what the server holds of it (MANIFEST), the chunks requested (FETCH), and their bytes as
DATA frames until END. A FETCH over another transport is answered with that transport's
messages (`out_of_band.py`) instead of DATA."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from netloader.errors import ProtocolError
from netloader.manifest import MAX_NAME_LENGTH, Manifest
from netloader.protocol.body import Message, typed_field
from netloader.protocol.frames import MsgType, encode_data_header, encode_json


class Part(Enum):
    """What a server offers, each with its own manifest and chunks: the weights, the
    model directory's other files (config, tokenizer: what a node needs beside them), an
    engine's compile cache (code the client will run: see SHARE_COMPILE_CACHE), and the
    manifest of the checkpoint its weights came from."""

    WEIGHTS = "weights"
    FILES = "files"
    COMPILE_CACHE = "compile-cache"
    # The manifest of the checkpoint (version) an engine's weights were loaded from, when
    # the server knows it: what an instance that loads those weights holds then, for its
    # live updates to compare with. Only a manifest: its chunks are not served.
    CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class GetManifest(Message):
    """Client: the manifest of `part`; FETCHes that follow name its chunks. `version`: the
    version of the weights it wants ("": any; a server that keeps an earlier version
    beside its current one offers that one to a client asking for it)."""

    TYPE: ClassVar[MsgType] = MsgType.GET_MANIFEST
    part: Part = Part.WEIGHTS
    version: str = ""

    def body(self) -> dict[str, Any]:
        return {"part": self.part.value, **({"version": self.version} if self.version else {})}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> GetManifest:
        version = body.get("version", "")
        if not isinstance(version, str) or len(version) > MAX_NAME_LENGTH:
            raise ProtocolError(
                f"GET_MANIFEST: the version must be a string of 0-{MAX_NAME_LENGTH} chars"
            )
        try:
            return cls(Part(body.get("part", Part.WEIGHTS.value)), version)
        except ValueError:
            raise ProtocolError(
                f"GET_MANIFEST names an unknown part {body.get('part')!r}"
            ) from None


@dataclass(frozen=True)
class ManifestMessage(Message):
    """The server's manifest (see manifest.py for its JSON form and validation)."""

    TYPE: ClassVar[MsgType] = MsgType.MANIFEST
    manifest: Manifest

    def body(self) -> dict[str, Any]:
        return self.manifest.to_json()

    def encode(self) -> bytes:
        return encode_json(self.TYPE, self.manifest.json_bytes)

    @classmethod
    def decode(cls, body: dict[str, Any]) -> ManifestMessage:
        return cls(Manifest.from_json(body))


@dataclass(frozen=True)
class Fetch(Message):
    """Client: send these chunks (indices into the manifest's chunks) over `transport`."""

    TYPE: ClassVar[MsgType] = MsgType.FETCH
    transport: str
    chunks: tuple[int, ...]

    def body(self) -> dict[str, Any]:
        return {"transport": self.transport, "chunks": list(self.chunks)}

    @classmethod
    def decode(cls, body: dict[str, Any]) -> Fetch:
        transport = typed_field(body, "transport", str)
        chunks = typed_field(body, "chunks", list)
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in chunks):
            raise ProtocolError("FETCH chunks must be chunk indices")
        return cls(transport, tuple(chunks))

    def validate(self, manifest: Manifest) -> Fetch:
        """Every chunk must exist in `manifest`, none twice; returns self."""
        total = manifest.chunk_total
        if bad := [c for c in self.chunks if not 0 <= c < total][:1]:
            raise ProtocolError(f"FETCH names chunk {bad[0]}; the manifest has {total}")
        if len(set(self.chunks)) != len(self.chunks):
            raise ProtocolError("FETCH names a chunk twice")
        return self


@dataclass(frozen=True)
class Data:
    """A chunk's bytes (in memory; the socket path reads them straight into tensors)."""

    TYPE: ClassVar[MsgType] = MsgType.DATA
    chunk: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_data_header(self.chunk, len(self.payload)) + self.payload


@dataclass(frozen=True)
class End(Message):
    """Server: every chunk of the FETCH was sent as DATA."""

    TYPE: ClassVar[MsgType] = MsgType.END
