"""The contract between server and client: who the model is, and every tensor's bytes.

A manifest names the model and its parallel layout, then lists each tensor's name, dtype,
shape, byte length and one xxh3-128 digest per chunk of `chunk_bytes`. Chunks are the unit
of transfer and of verification, so a transfer can be split, resumed and relayed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
import xxhash

from netloader import tensors as tb
from netloader.errors import ProtocolError

MANIFEST_FORMAT = 1  # carried in the JSON field "protocol"
DIGEST_ALGORITHM = "xxh3_128"
DEFAULT_CHUNK_BYTES = 16 << 20
MAX_TENSORS = 1_000_000
MAX_NAME_LENGTH = 1024
MAX_DIMS = 16
MAX_TENSOR_BYTES = 1 << 44  # 16 TiB: bounds every length a manifest may claim
MAX_CHUNK_BYTES = 1 << 28  # a chunk is received (and its memory prefaulted) in one piece


def digest(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def new_hasher() -> xxhash.xxh3_128:
    """Streaming form of `digest`: the same result over the same bytes fed in pieces."""
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class Identity:
    """What must match before any byte moves: model name, parallel layout, and any
    further attributes an integration cares about (dtype, quantization, loader layout)."""

    model: str
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)

    def differences(self, offered: Identity) -> list[str]:
        """What in `offered` (a server's identity) contradicts this expectation. Name and
        layout always count; an attribute counts only when this side states it, so a
        client that names just the model accepts a server that says more about it (the
        manifest's tensors and digests remain the contract)."""
        out = [
            f"{name}: expected {mine!r}, server has {theirs!r}"
            for name in ("model", "tp_size", "tp_rank", "pp_size", "pp_rank")
            if (mine := getattr(self, name)) != (theirs := getattr(offered, name))
        ]
        if self.model != offered.model:
            out[0] += f" (pass {offered.model!r} to load the model it serves)"
        for key in sorted(self.attributes):
            mine_a, theirs_a = self.attributes[key], offered.attributes.get(key)
            if mine_a == theirs_a:
                continue
            hint = (
                "the server does not state it; leave it out to accept any"
                if theirs_a is None
                else "a different model or build: `netloader inspect` shows the server's identity"
            )
            out.append(f"attribute {key}: expected {mine_a!r}, server has {theirs_a!r} ({hint})")
        return out


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """What tells two models with the same shapes apart before any byte moves: a digest of
    their configuration (e.g. a Hugging Face config.json), less what names a place or a
    tool rather than the model."""
    kept = {
        k: v for k, v in config.items() if not k.startswith("_") and k != "transformers_version"
    }
    return digest(json.dumps(kept, sort_keys=True, default=str).encode())[:16]


class Chunk(NamedTuple):
    tensor: int  # index into Manifest.tensors
    number: int  # chunk number within the tensor
    offset: int  # byte offset within the tensor
    length: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    digests: tuple[str, ...] = ()  # empty on a client's expectation

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class Manifest:
    identity: Identity
    tensors: tuple[TensorEntry, ...]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def chunk_total(self) -> int:
        """Chunks in all (computed once: every connection to a server asks)."""
        return sum(self.chunk_count(t) for t in range(len(self.tensors)))

    def chunk_count(self, tensor: int) -> int:
        return max(1, math.ceil(self.tensors[tensor].nbytes / self.chunk_bytes))

    def chunk(self, tensor: int, index: int) -> Chunk:
        offset = index * self.chunk_bytes
        length = min(self.chunk_bytes, self.tensors[tensor].nbytes - offset)
        return Chunk(tensor, index, offset, length)

    def chunks(self) -> Iterator[Chunk]:
        for t in range(len(self.tensors)):
            for c in range(self.chunk_count(t)):
                yield self.chunk(t, c)

    # ---- comparison ---------------------------------------------------------------------
    def differences(self, offered: Manifest, limit: int = 20) -> list[str]:
        """What differs between this (expected) manifest and the server's, digests aside.
        Lists identity differences, then the first `limit` tensor differences."""
        out = self.identity.differences(offered.identity)
        theirs = {t.name: t for t in offered.tensors}
        mine_names = {t.name for t in self.tensors}
        tensor_diffs: list[str] = []
        for entry in self.tensors:
            other = theirs.get(entry.name)
            if other is None:
                tensor_diffs.append(f"tensor {entry.name!r} missing on server")
            elif (entry.dtype, entry.shape) != (other.dtype, other.shape):
                tensor_diffs.append(
                    f"tensor {entry.name!r}: expected {entry.describe()}, "
                    f"server has {other.describe()}"
                )
        tensor_diffs += [
            f"tensor {t.name!r} on server only ({t.describe()})"
            for t in offered.tensors
            if t.name not in mine_names
        ]
        if out:  # an identity difference explains the tensor ones: show only a few
            limit = min(limit, 3)
        if len(tensor_diffs) > limit:
            tensor_diffs = [
                *tensor_diffs[:limit],
                f"... {len(tensor_diffs) - limit} more tensor differences",
            ]
        return out + tensor_diffs

    # ---- JSON form (the wire format; decoding validates everything) ---------------------
    def to_json(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "protocol": MANIFEST_FORMAT,
            "digest": DIGEST_ALGORITHM,
            "chunk_bytes": self.chunk_bytes,
            "identity": {
                "model": ident.model,
                "tp_size": ident.tp_size,
                "tp_rank": ident.tp_rank,
                "pp_size": ident.pp_size,
                "pp_rank": ident.pp_rank,
                "attributes": dict(ident.attributes),
            },
            "tensors": [
                [t.name, t.dtype, list(t.shape), t.nbytes, list(t.digests)] for t in self.tensors
            ],
        }

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Decode and validate a manifest from untrusted JSON; raise ProtocolError."""
        v = _Validator("manifest")
        obj = v.mapping(obj)
        if v.integer(obj.get("protocol"), "protocol") != MANIFEST_FORMAT:
            raise ProtocolError(f"manifest protocol {obj.get('protocol')!r} != {MANIFEST_FORMAT}")
        if obj.get("digest") != DIGEST_ALGORITHM:
            raise ProtocolError(f"manifest digest algorithm {obj.get('digest')!r} is not supported")
        chunk_bytes = v.integer(obj.get("chunk_bytes"), "chunk_bytes", low=1, high=MAX_CHUNK_BYTES)
        ident = v.mapping(obj.get("identity"), "identity")
        attributes = v.mapping(ident.get("attributes", {}), "identity.attributes")
        identity = Identity(
            model=v.string(ident.get("model"), "identity.model"),
            tp_size=v.integer(ident.get("tp_size"), "tp_size", low=1, high=1 << 20),
            tp_rank=v.integer(ident.get("tp_rank"), "tp_rank", high=1 << 20),
            pp_size=v.integer(ident.get("pp_size"), "pp_size", low=1, high=1 << 20),
            pp_rank=v.integer(ident.get("pp_rank"), "pp_rank", high=1 << 20),
            attributes={
                v.string(k, "attribute name"): v.string(val, f"attribute {k}", empty_ok=True)
                for k, val in attributes.items()
            },
        )
        rows = obj.get("tensors")
        if not isinstance(rows, list) or len(rows) > MAX_TENSORS:
            raise ProtocolError(f"manifest tensors must be a list of at most {MAX_TENSORS}")
        entries, seen = [], set()
        for i, row in enumerate(rows):
            entry = _entry_from_json(row, i, chunk_bytes, v)
            if entry.name in seen:
                raise ProtocolError(f"manifest names tensor {entry.name!r} twice")
            seen.add(entry.name)
            entries.append(entry)
        return cls(identity, tuple(entries), chunk_bytes)


def _entry_from_json(row: Any, i: int, chunk_bytes: int, v: _Validator) -> TensorEntry:
    if not isinstance(row, list) or len(row) != 5:
        raise ProtocolError(f"manifest tensor #{i} must be [name, dtype, shape, nbytes, digests]")
    name = v.string(row[0], f"tensor #{i} name")
    dtype = v.string(row[1], f"tensor {name!r} dtype")
    if not tb.is_known_dtype(dtype):
        raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    shape_raw = row[2]
    if not isinstance(shape_raw, list) or len(shape_raw) > MAX_DIMS:
        raise ProtocolError(f"tensor {name!r} shape must be a list of at most {MAX_DIMS} sizes")
    shape = tuple(v.integer(d, f"tensor {name!r} shape", high=MAX_TENSOR_BYTES) for d in shape_raw)
    nbytes = v.integer(row[3], f"tensor {name!r} nbytes", high=MAX_TENSOR_BYTES)
    if math.prod(shape) * tb.itemsize(dtype) != nbytes:
        raise ProtocolError(f"tensor {name!r}: nbytes {nbytes} does not match {dtype}{list(shape)}")
    digests = row[4]
    expected = max(1, math.ceil(nbytes / chunk_bytes))
    if not isinstance(digests, list) or len(digests) not in (0, expected):
        raise ProtocolError(f"tensor {name!r} must carry {expected} chunk digests")
    for d in digests:
        if not (isinstance(d, str) and len(d) == 32 and all(c in "0123456789abcdef" for c in d)):
            raise ProtocolError(f"tensor {name!r} has a malformed digest {d!r}")
    return TensorEntry(name, dtype, shape, nbytes, tuple(digests))


class _Validator:
    def __init__(self, what: str) -> None:
        self.what = what

    def mapping(self, value: Any, where: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.what} {where or 'body'} must be an object")
        return value

    def integer(self, value: Any, where: str, low: int = 0, high: int = 1 << 62) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ProtocolError(f"{self.what} {where} must be an integer in [{low}, {high}]")
        return value

    def string(self, value: Any, where: str, *, empty_ok: bool = False) -> str:
        if (
            not isinstance(value, str)
            or len(value) > MAX_NAME_LENGTH
            or (not value and not empty_ok)
        ):
            raise ProtocolError(
                f"{self.what} {where} must be a string of 1-{MAX_NAME_LENGTH} chars"
            )
        return value


# ---- building manifests from tensors ----------------------------------------------------


def expected_manifest(identity: Identity, tensors: Mapping[str, torch.Tensor]) -> Manifest:
    """What a client expects: names, dtypes, shapes, sizes; no digests."""
    return Manifest(identity, tuple(_entry(name, t, ()) for name, t in tensors.items()))


def build_manifest(
    identity: Identity,
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> Manifest:
    """The server's manifest, with a digest for every chunk of every tensor."""
    entries = []
    for name, t in tensors.items():
        flat = tb.flat_bytes(t).cpu()
        view = tb.byte_view(flat)
        digests = tuple(
            digest(view[off : off + chunk_bytes])
            for off in range(0, max(1, len(view)), chunk_bytes)
        )
        entries.append(_entry(name, t, digests))
    return Manifest(identity, tuple(entries), chunk_bytes)


def _entry(name: str, t: torch.Tensor, digests: tuple[str, ...]) -> TensorEntry:
    return TensorEntry(
        name, tb.dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size(), digests
    )
