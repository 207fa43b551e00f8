"""The contract between server and client: who the model is, and every tensor's bytes.

A manifest names the model and its parallel layout, lists each tensor's name, dtype, shape
and byte length, and carries one xxh3-128 digest per chunk. Chunks are the unit of
transfer and of verification, so a transfer can be split, resumed and relayed.

The chunks are not listed: both sides plan them from the tensors and `chunk_bytes`
(`plan_chunks`), so they depend on the tensors' shapes alone, never on their contents.
Three things rest on that plan:
- small tensors are coalesced: a chunk holds consecutive tensors, whole, up to
  `chunk_bytes` and MAX_PIECES of them, so every chunk costs about the same whatever the
  tensor sizes (a mixture-of-experts checkpoint holds tens of thousands of small tensors);
- a tensor larger than `chunk_bytes` has chunks of its own, cut on row (dim 0)
  boundaries, so a reader can fetch and verify a range of rows without the rest; with
  `column_tiles` T > 1, a matrix's chunks are each a range of rows of one of T column
  tiles (a strided piece), so a reader can fetch and verify a range of columns too (the
  shard of a row-parallel layer);
- two versions of a model with the same shapes have the same chunks, so a chunk whose
  digest is unchanged need not move again.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, NamedTuple

import torch
import xxhash

from netloader import device_digest as dd
from netloader import tensors as tb
from netloader.errors import ProtocolError

# 2: chunks coalesce small tensors and split large ones on rows, one digest per chunk
MANIFEST_FORMAT = 2  # carried in the JSON field "protocol"
DIGEST_ALGORITHM = "xxh3_128"
DEFAULT_CHUNK_BYTES = 16 << 20
MAX_PIECES = 1024  # tensors in one chunk: the iovecs one process_vm_readv or sendmsg takes
MAX_TENSORS = 1_000_000
MAX_CHUNKS = 4_000_000
MAX_NAME_LENGTH = 1024
MAX_DIMS = 16
MAX_TENSOR_BYTES = 1 << 44  # 16 TiB: bounds every length a manifest may claim
MAX_COLUMN_TILES = 64
MAX_TILE_ROWS = 1 << 14  # rows (runs) of a column tile in one chunk
MAX_CHUNK_BYTES = 1 << 28  # a chunk is received (and its memory prefaulted) in one piece
_HEX = frozenset("0123456789abcdef")
_ITEMSIZE = {name: tb.itemsize(name) for name in tb.known_dtypes()}


def digest(data: memoryview | bytes) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def new_hasher() -> xxhash.xxh3_128:
    """Streaming form of `digest`: the same result over the same bytes fed in pieces."""
    return xxhash.xxh3_128()


@dataclass(frozen=True)
class Identity:
    """What must match before any byte moves: model name, parallel layout, and any
    further attributes an integration cares about (dtype, quantization, loader layout).
    `version`: which version of the model's weights ("" when unversioned); a client that
    states one takes only that one."""

    model: str
    tp_size: int = 1
    tp_rank: int = 0
    pp_size: int = 1
    pp_rank: int = 0
    attributes: Mapping[str, str] = field(default_factory=dict)
    version: str = ""

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
        if self.version and self.version != offered.version:
            out.append(f"version: expected {self.version!r}, server has {offered.version!r}")
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


class Piece(NamedTuple):
    """Bytes [offset, offset + length) of the manifest's tensor number `tensor`; or, with
    `repeat` > 1, that many such runs, `stride` bytes apart (rows of a column tile)."""

    tensor: int
    offset: int
    length: int
    repeat: int = 1
    stride: int = 0

    @property
    def nbytes(self) -> int:
        return self.length * self.repeat

    def of(self, flat: torch.Tensor) -> torch.Tensor:
        """This piece of a tensor's bytes (`flat`, uint8): a slice, or for a strided piece
        a (repeat, length) view of its runs. On the wire and in its digest a strided piece
        is packed: its runs back to back."""
        if self.repeat == 1:
            return flat[self.offset : self.offset + self.length]
        start = flat.storage_offset() + self.offset  # as_strided counts from the storage
        return flat.as_strided((self.repeat, self.length), (self.stride, 1), start)

    def runs(self, here: int, there: int) -> list[tuple[int, int, int]]:
        """(address here, address there, length) of each run, for a piece packed at `here`
        and laid out as it is in the tensor at `there` (a read of process memory)."""
        if self.repeat == 1:
            return [(here, there, self.length)]
        n, stride = self.length, self.stride
        return [(here + i * n, there + i * stride, n) for i in range(self.repeat)]


class Chunk(NamedTuple):
    """The unit of transfer and of verification: `pieces` of tensors whose bytes, in
    order, have the manifest's digest number `number`; `length` bytes in all."""

    number: int  # the chunk's position in the manifest's chunks
    pieces: tuple[Piece, ...]
    length: int

    @property
    def strided(self) -> bool:
        """A column tile: one strided piece (the plan never mixes it with others)."""
        return self.pieces[0].repeat > 1 if len(self.pieces) == 1 else False


class TensorEntry(NamedTuple):
    """One tensor of a manifest (a tuple: a mixture-of-experts manifest has 100,000)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along dim 0 (all of them for a scalar or an empty tensor)."""
        rows = self.shape[0] if self.shape else 1
        return self.nbytes // rows if rows else self.nbytes


def plan_chunks(
    tensors: Sequence[TensorEntry],
    chunk_bytes: int,
    limit: int = MAX_CHUNKS,
    column_tiles: int = 1,
) -> tuple[Chunk, ...]:
    """The chunks of `tensors`, in order (see the module's docstring). Consecutive tensors
    of at most `chunk_bytes` share a chunk while it has room; a larger tensor gets chunks
    of its own, each as many whole rows as fit (or `chunk_bytes` of a row longer than
    that), or with `column_tiles` > 1 and a matrix whose columns it divides, those same
    ranges of rows (at most MAX_TILE_ROWS of them) cut into one chunk per column tile. An
    empty tensor is a zero-length piece of the chunk it falls in. ProtocolError past
    `limit` chunks (a hostile manifest's tiny chunk size)."""
    if not 1 <= column_tiles <= MAX_COLUMN_TILES:
        raise ProtocolError(f"column tiles must be 1 to {MAX_COLUMN_TILES}, not {column_tiles}")
    chunks: list[Chunk] = []
    pieces: list[Piece] = []
    filled = 0
    for i, entry in enumerate(tensors):
        size = entry.nbytes
        if pieces and (size > chunk_bytes - filled or len(pieces) == MAX_PIECES):
            chunks.append(Chunk(len(chunks), tuple(pieces), filled))
            pieces, filled = [], 0
        if size <= chunk_bytes:
            pieces.append(Piece(i, 0, size))
            filled += size
            continue
        row = entry.row_bytes
        if column_tiles > 1 and _tiled(entry, column_tiles, chunk_bytes):
            # The rows a chunk would hold untiled, so a range of rows costs the same.
            tile = row // column_tiles
            rows = entry.shape[0]
            per_chunk = max(1, min(chunk_bytes // row, MAX_TILE_ROWS))
            if len(chunks) + -(-rows // per_chunk) * column_tiles > limit:
                raise ProtocolError(f"manifest would have more than {limit} chunks")
            for first in range(0, rows, per_chunk):
                count = min(per_chunk, rows - first)
                for t in range(column_tiles):
                    piece = Piece(i, first * row + t * tile, tile, count, row)
                    chunks.append(Chunk(len(chunks), (piece,), tile * count))
            continue
        step = (chunk_bytes // row) * row if row <= chunk_bytes else chunk_bytes
        if len(chunks) + -(-size // step) > limit:
            raise ProtocolError(f"manifest would have more than {limit} chunks")
        for offset in range(0, size, step):
            length = min(step, size - offset)
            chunks.append(Chunk(len(chunks), (Piece(i, offset, length),), length))
    if pieces:
        chunks.append(Chunk(len(chunks), tuple(pieces), filled))
    if len(chunks) > limit:
        raise ProtocolError(f"manifest would have more than {limit} chunks")
    return tuple(chunks)


def _touches(piece: Piece, row: int, rows: tuple[int, int], cols: tuple[int, int]) -> bool:
    """Whether `piece` of a tensor of `row` bytes per row holds any of byte columns [cols)
    of rows [rows)."""
    if not row:
        return True
    if piece.repeat > 1:  # rows of a column tile
        first, start = divmod(piece.offset, row)
        return (
            first < rows[1]
            and rows[0] < first + piece.repeat
            and start < cols[1]
            and cols[0] < start + piece.length
        )
    offset = piece.offset
    end = offset + max(piece.length, 1)
    first, last = max(offset // row, rows[0]), min((end - 1) // row, rows[1] - 1)
    for r in {first, last} if first <= last else set():
        if max(offset, r * row + cols[0]) < min(end, r * row + cols[1]):
            return True
    return last - first > 1  # a row between them is held whole


def _tiled(entry: TensorEntry, column_tiles: int, chunk_bytes: int) -> bool:
    """Whether a large tensor is cut into column tiles: a matrix whose columns they divide,
    a tile's row within a chunk."""
    shape = entry.shape
    return (
        len(shape) == 2
        and shape[0] > 0
        and shape[1] % column_tiles == 0
        and entry.row_bytes // column_tiles <= chunk_bytes
    )


@dataclass(frozen=True)
class Manifest:
    """identity:    who the model is and its parallel layout.
    tensors:     every tensor's name, dtype, shape and size, in transfer order.
    chunk_bytes: what the chunks are planned with (`plan_chunks`).
    digests:     one per chunk, in order; empty on a client's expectation.
    column_tiles: matrices larger than a chunk are cut into this many column tiles
                 (`plan_chunks`); 1: rows only.
    device_digests: one device digest (device_digest.py) per chunk, beside `digests`, for
                 a model held in device memory (so a client can verify chunks that never
                 leave a device); empty otherwise. Optional in the JSON form: a manifest
                 without them is the same as before they existed."""

    identity: Identity
    tensors: tuple[TensorEntry, ...]
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    digests: tuple[str, ...] = ()
    column_tiles: int = 1
    device_digests: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        """Every chunk, in order (planned once: every connection to a server asks)."""
        return plan_chunks(self.tensors, self.chunk_bytes, column_tiles=self.column_tiles)

    @property
    def chunk_total(self) -> int:
        return len(self.chunks)

    @cached_property
    def largest_chunk(self) -> int:
        """The length of the longest chunk (0 without chunks)."""
        return max((c.length for c in self.chunks), default=0)

    def chunks_of(self, tensor: int) -> range:
        """The numbers of the chunks holding tensor `tensor`'s bytes (consecutive: chunks
        follow the tensors' order)."""
        first, last = self._spans
        return range(first[tensor], last[tensor] + 1)

    @cached_property
    def _spans(self) -> tuple[list[int], list[int]]:
        first, last = [0] * len(self.tensors), [0] * len(self.tensors)
        for chunk in reversed(self.chunks):
            for piece in chunk.pieces:
                first[piece.tensor] = chunk.number
        for chunk in self.chunks:
            for piece in chunk.pieces:
                last[piece.tensor] = chunk.number
        return first, last

    def chunks_covering(self, tensor: int, box: Sequence[tuple[int, int]]) -> list[int]:
        """The numbers of the chunks holding any element of `box` (a [start, stop) range
        of indices for each leading dimension, the others whole) of tensor number `tensor`:
        what a client fetches, and verifies whole, for that part of it (a tensor-parallel
        shard: some rows, or some columns of a matrix)."""
        entry = self.tensors[tensor]
        row = entry.row_bytes
        rows = box[0] if box else (0, entry.shape[0] if entry.shape else 1)
        column = row // entry.shape[1] if len(entry.shape) > 1 and entry.shape[1] else row
        cols = (box[1][0] * column, box[1][1] * column) if len(box) > 1 else (0, row)
        if rows[0] >= rows[1] or cols[0] >= cols[1]:
            return []
        return [
            number
            for number in self.chunks_of(tensor)
            if any(
                piece.tensor == tensor and _touches(piece, row, rows, cols)
                for piece in self.chunks[number].pieces
            )
        ]

    def describe_chunk(self, chunk: Chunk) -> str:
        """Which tensors a chunk holds, for messages: "tensor 'a'", or "tensors 'a' ...
        'b' (12)"."""
        first = self.tensors[chunk.pieces[0].tensor].name
        if len(chunk.pieces) == 1:
            return f"tensor {first!r}"
        last = self.tensors[chunk.pieces[-1].tensor].name
        return f"tensors {first!r} ... {last!r} ({len(chunk.pieces)})"

    def chunks_holding(self, names: Collection[str]) -> list[int]:
        """The numbers of the chunks holding any byte of the tensors named `names`."""
        return sorted(
            {c for i, t in enumerate(self.tensors) if t.name in names for c in self.chunks_of(i)}
        )

    def tensor_names(self, chunks: Sequence[int]) -> list[str]:
        """The names of the tensors in these chunks, in order, once each."""
        seen: dict[str, None] = {}
        for index in chunks:
            for piece in self.chunks[index].pieces:
                seen[self.tensors[piece.tensor].name] = None
        return list(seen)

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
            **({"column_tiles": self.column_tiles} if self.column_tiles > 1 else {}),
            "identity": {
                "model": ident.model,
                "tp_size": ident.tp_size,
                "tp_rank": ident.tp_rank,
                "pp_size": ident.pp_size,
                "pp_rank": ident.pp_rank,
                "attributes": dict(ident.attributes),
                **({"version": ident.version} if ident.version else {}),
            },
            "tensors": [[t.name, t.dtype, list(t.shape), t.nbytes] for t in self.tensors],
            "digests": "".join(self.digests),
            **(
                {
                    "device_digest": dd.DEVICE_DIGEST_ALGORITHM,
                    "device_digests": "".join(self.device_digests),
                }
                if self.device_digests
                else {}
            ),
        }

    @cached_property
    def json_bytes(self) -> bytes:
        """`to_json`, encoded (once: a server sends the same manifest to every client, and
        a mixture-of-experts manifest is megabytes)."""
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, obj: Any) -> Manifest:
        """Decode and validate a manifest from untrusted JSON; raise ProtocolError."""
        v = _Validator("manifest")
        obj = v.mapping(obj)
        if v.integer(obj.get("protocol"), "protocol") != MANIFEST_FORMAT:
            raise ProtocolError(
                f"manifest format {obj.get('protocol')!r} is not this version's "
                f"({MANIFEST_FORMAT}): upgrade the older side"
            )
        if obj.get("digest") != DIGEST_ALGORITHM:
            raise ProtocolError(f"manifest digest algorithm {obj.get('digest')!r} is not supported")
        chunk_bytes = v.integer(obj.get("chunk_bytes"), "chunk_bytes", low=1, high=MAX_CHUNK_BYTES)
        tiles = v.integer(obj.get("column_tiles", 1), "column_tiles", low=1, high=MAX_COLUMN_TILES)
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
            version=v.string(ident.get("version", ""), "identity.version", empty_ok=True),
        )
        rows = obj.get("tensors")
        if not isinstance(rows, list) or len(rows) > MAX_TENSORS:
            raise ProtocolError(f"manifest tensors must be a list of at most {MAX_TENSORS}")
        entries = [_entry_from_json(row, i, v) for i, row in enumerate(rows)]
        if len({e.name for e in entries}) != len(entries):
            names = [e.name for e in entries]
            twice = next(n for i, n in enumerate(names) if n in names[:i])
            raise ProtocolError(f"manifest names tensor {twice!r} twice")
        manifest = cls(identity, tuple(entries), chunk_bytes, column_tiles=tiles)
        digests = _digests_from_json(obj.get("digests", ""), 32, "digests", manifest)
        device: tuple[str, ...] = ()
        if "device_digests" in obj:
            if obj.get("device_digest") != dd.DEVICE_DIGEST_ALGORITHM:
                raise ProtocolError(
                    f"manifest device digest algorithm {obj.get('device_digest')!r} is not "
                    "supported"
                )
            device = _digests_from_json(
                obj["device_digests"], dd.DEVICE_DIGEST_HEX, "device digests", manifest
            )
            if device and not digests:
                raise ProtocolError("manifest carries device digests without digests")
        if digests:
            planned = manifest.chunks
            manifest = cls(identity, manifest.tensors, chunk_bytes, digests, tiles, device)
            manifest.__dict__["chunks"] = planned  # the cached plan: the same tensors
        return manifest


def _digests_from_json(text: Any, size: int, what: str, manifest: Manifest) -> tuple[str, ...]:
    """Digests of `size` hex digits, one per chunk of `manifest` (or none), from a string."""
    if not isinstance(text, str) or len(text) > size * MAX_CHUNKS or len(text) % size:
        raise ProtocolError(f"manifest {what} must be a string of {size}-hex-digit digests")
    if not text:
        return ()
    if not _HEX.issuperset(text):
        raise ProtocolError(f"manifest {what} must be lowercase hex")
    digests = tuple(text[i : i + size] for i in range(0, len(text), size))
    if len(digests) != manifest.chunk_total:
        raise ProtocolError(
            f"manifest carries {len(digests)} {what} for {manifest.chunk_total} chunks"
        )
    return digests


def _entry_from_json(row: Any, i: int, v: _Validator) -> TensorEntry:
    # Written for speed: a mixture-of-experts manifest has 100,000 rows. `type(x) is int`
    # also refuses bools.
    if type(row) is not list or len(row) != 4:
        raise ProtocolError(f"manifest tensor #{i} must be [name, dtype, shape, nbytes]")
    name, dtype, shape, nbytes = row
    if type(name) is not str or not 0 < len(name) <= MAX_NAME_LENGTH:
        v.string(name, f"tensor #{i} name")
    if type(dtype) is not str or dtype not in _ITEMSIZE:
        raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or not all(type(d) is int and 0 <= d <= MAX_TENSOR_BYTES for d in shape)
    ):
        raise ProtocolError(
            f"tensor {name!r} shape must be a list of at most {MAX_DIMS} sizes in "
            f"[0, {MAX_TENSOR_BYTES}]"
        )
    if type(nbytes) is not int or math.prod(shape) * _ITEMSIZE[dtype] != nbytes:
        raise ProtocolError(f"tensor {name!r}: nbytes {nbytes!r} does not match {dtype}{shape}")
    return TensorEntry(name, dtype, tuple(shape), nbytes)


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
    return Manifest(identity, tuple(_entry(name, t) for name, t in tensors.items()))


def build_manifest(
    identity: Identity,
    tensors: Mapping[str, torch.Tensor],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    column_tiles: int = 1,
    device_digests: bool | None = None,
) -> Manifest:
    """The server's manifest, with the digest of every chunk. Host memory beyond the
    tensors' own stays within a chunk (device tensors) or a tensor (non-contiguous ones).
    `device_digests`: also the device digest of every chunk, computed where the tensors
    are; None: when every tensor is in device memory (`device_resident`)."""
    values = list(tensors.values())
    if device_digests is None:
        device_digests = device_resident(values)
    entries = tuple(_entry(name, t) for name, t in tensors.items())
    plain = Manifest(identity, entries, chunk_bytes, column_tiles=column_tiles)
    # Each tensor's flat bytes (a copy of a non-contiguous one) and, on the host, their
    # view, while its chunks last.
    held: dict[int, tuple[torch.Tensor, memoryview | None]] = {}

    def flat_of(index: int) -> tuple[torch.Tensor, memoryview | None]:
        if index not in held:
            flat = tb.flat_bytes(values[index])
            held[index] = (flat, tb.byte_view(flat) if flat.device.type == "cpu" else None)
        return held[index]

    def piece_bytes(piece: Piece) -> memoryview:
        flat, view = flat_of(piece.tensor)
        if view is None or piece.repeat > 1:  # copied (packed) to the host
            packed = piece.of(flat).contiguous().cpu().reshape(-1)
            return tb.owned_view(packed).toreadonly()
        return view[piece.offset : piece.offset + piece.length]

    digests, device = [], []
    for chunk in plain.chunks:
        for index in [i for i in held if i < chunk.pieces[0].tensor]:
            del held[index]
        digests.append(chunk_digest(chunk, piece_bytes))
        if device_digests:
            device.append(dd.chunk_digest([p.of(flat_of(p.tensor)[0]) for p in chunk.pieces]))
    return Manifest(
        identity, plain.tensors, chunk_bytes, tuple(digests), column_tiles, tuple(device)
    )


def device_resident(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a model is held in device memory: every tensor off the CPU."""
    return bool(tensors) and all(t.device.type != "cpu" for t in tensors)


def chunk_digest(chunk: Chunk, piece_bytes: Callable[[Piece], memoryview]) -> str:
    """The digest of `chunk`: of its pieces' bytes (`piece_bytes`, a strided one packed) in
    order."""
    return digest_of([piece_bytes(piece) for piece in chunk.pieces])


def digest_of(views: Sequence[memoryview]) -> str:
    """The digest of these buffers' bytes, concatenated (a chunk's pieces)."""
    if len(views) == 1:
        return digest(views[0])
    hasher = new_hasher()
    for view in views:
        hasher.update(view)
    return hasher.hexdigest()


def _entry(name: str, t: torch.Tensor) -> TensorEntry:
    return TensorEntry(name, tb.dtype_name(t.dtype), tuple(t.size()), t.nbytes)
