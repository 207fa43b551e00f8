"""safetensors checkpoints on disk: reading one (single file or sharded with an index) to
serve it, the identity it is served under, and writing one (its sharding kept) whose
tensor bytes are received straight into the files."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import load_file

from netloader import tensors as tb
from netloader.errors import NetloaderError
from netloader.files import valid_name
from netloader.manifest import Identity, Manifest, TensorEntry, build_manifest, config_fingerprint

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHECKPOINT_WEIGHTS = "checkpoint"  # identity attribute "weights" of a served checkpoint


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (or a single file)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise NetloaderError(f"{path} is neither a safetensors file nor a directory")
    index = path / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise NetloaderError(f"{index} is not a valid safetensors index: {exc}") from exc
        files = []
        for name in sorted(set(map(str, weight_map.values()))):
            # Checked by name, not by resolving links: a Hugging Face cache's shards are
            # links into its blob store, outside the snapshot directory, and legitimate.
            if Path(name).is_absolute() or ".." in Path(name).parts:
                raise NetloaderError(f"{index} names {name!r}, outside {path}: refused")
            files.append(path / name)
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise NetloaderError(f"no *.safetensors files in {path}")
    return files


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, in memory, in file order then name order.

    Copied out of the file mapping (safetensors maps lazily), so that what is served does
    not change, or get read back from disk, if the file is rewritten or evicted."""
    tensors: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(path):
        try:
            loaded = load_file(file)
        except Exception as exc:  # safetensors raises its own error types, and OSError
            raise NetloaderError(f"{file} is not a readable safetensors file: {exc}") from None
        for name, tensor in loaded.items():
            if name in tensors:
                raise NetloaderError(f"tensor {name!r} appears in more than one file of {path}")
            tensors[name] = tensor.clone()
    return tensors


@dataclass(frozen=True)
class LocalCheckpoint:
    """A checkpoint directory a model was loaded from, as its files were then (name, size,
    modification time, inode): what a live update compares the new version with, for an
    instance that loaded from disk and so has no manifest of what it holds."""

    directory: Path
    stamp: tuple[tuple[str, int, int, int], ...]

    @classmethod
    def of(cls, directory: Path) -> LocalCheckpoint | None:
        """The checkpoint in `directory` as it is now; None when it has no safetensors."""
        try:
            return cls(directory, _stamp(checkpoint_files(directory)))
        except (NetloaderError, OSError):
            return None

    def unchanged(self) -> LocalCheckpoint | None:
        """This, if its files are still as they were (e.g. after loading from them, to know
        that the model holds what they hold); else None."""
        return self if LocalCheckpoint.of(self.directory) == self else None

    def manifest_like(self, offered: Manifest) -> Manifest:
        """The manifest of these files, planned as `offered` is (its tensors' order, chunk
        size, column tiles), read from disk (the page cache, usually). NetloaderError when
        the files changed since the model was loaded from them (they would no longer say
        what it holds) or cannot be read."""
        files = checkpoint_files(self.directory)
        if _stamp(files) != self.stamp:  # the model holds what they held then
            raise NetloaderError(
                f"the checkpoint files in {self.directory} changed since this instance "
                "loaded them: they no longer tell what it holds"
            )
        tensors: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                tensors.update(load_file(file))  # mapped: read once, while digested
            except Exception as exc:  # safetensors raises its own error types, and OSError
                raise NetloaderError(f"{file} is not a readable safetensors file: {exc}") from None
        if set(tensors) == {t.name for t in offered.tensors}:
            tensors = {t.name: tensors[t.name] for t in offered.tensors}
        held = build_manifest(offered.identity, tensors, offered.chunk_bytes, offered.column_tiles)
        if _stamp(files) != self.stamp:  # rewritten while digested: digests of a mixture
            raise NetloaderError(
                f"the checkpoint files in {self.directory} changed while they were digested"
            )
        return held


def _stamp(files: list[Path]) -> tuple[tuple[str, int, int, int], ...]:
    stats = [(file, file.stat()) for file in files]
    return tuple((str(f), st.st_size, st.st_mtime_ns, st.st_ino) for f, st in stats)


def checkpoint_identity(name: str, directory: Path) -> Identity:
    """The identity a checkpoint is served under: its name, the format (so an engine
    recognises tensors it must shard and fuse itself), and its config.json's fingerprint
    when it has one (what tells two fine-tunes of the same shapes apart)."""
    attributes = {"weights": CHECKPOINT_WEIGHTS}
    fingerprint = directory_fingerprint(directory)
    if fingerprint is not None:
        attributes["config"] = fingerprint
    return Identity(name, attributes=attributes)


def directory_fingerprint(directory: Path) -> str | None:
    """The fingerprint of a model directory's config.json; None without one (or when
    `directory` is a file); NetloaderError when it is not a JSON object."""
    config = directory / "config.json"
    if not config.is_file():
        return None
    try:
        parsed = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise NetloaderError(f"{config} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise NetloaderError(f"{config} does not hold a JSON object")
    return config_fingerprint(parsed)


def shards_from_index(index: bytes, manifest: Manifest) -> dict[str, str]:
    """Tensor name -> shard file name, from a safetensors index received beside the
    weights; refused unless it places exactly the manifest's tensors in plain
    `*.safetensors` file names."""
    try:
        weight_map = json.loads(index)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise NetloaderError(f"the served {INDEX_NAME} is not a valid index: {exc}") from None
    names = {t.name for t in manifest.tensors}
    if set(weight_map) != names:
        extra = sorted(set(weight_map) - names)[:3]
        missing = sorted(names - set(weight_map))[:3]
        raise NetloaderError(
            f"the served {INDEX_NAME} does not match the weights (only in the index: "
            f"{extra}; not in it: {missing})"
        )
    for file in set(weight_map.values()):
        if not (isinstance(file, str) and valid_name(file) and file.endswith(".safetensors")):
            raise NetloaderError(f"the served {INDEX_NAME} names a shard {file!r}: refused")
    return dict(weight_map)


class CheckpointWriter:
    """Lays out `manifest` as safetensors files in `out_dir` (`model.safetensors`, or the
    shards `shards` places each tensor in), maps them, and hands out tensors over the
    mappings so a pull receives straight into the files.

    Each file is written under a fresh hidden name (`.<name>.*.partial`) and renamed only
    by `commit()`, once durable, so an interrupted pull never leaves a file that looks
    complete.
    """

    def __init__(
        self, out_dir: Path, manifest: Manifest, shards: Mapping[str, str] | None = None
    ) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if "__metadata__" in {t.name for t in manifest.tensors}:
            raise NetloaderError("a tensor named '__metadata__' cannot be stored in safetensors")
        by_file: dict[str, list[TensorEntry]] = {}
        for entry in manifest.tensors:
            by_file.setdefault(shards[entry.name] if shards else SINGLE_NAME, []).append(entry)
        layouts = {name: _header(entries) for name, entries in by_file.items()}
        total = sum(len(h) + sum(t.nbytes for t in by_file[n]) for n, (h, _) in layouts.items())
        free = shutil.disk_usage(out_dir).free
        if total > free:
            raise NetloaderError(f"{out_dir} has {free} bytes free; the model needs {total}")
        self.files: list[_MappedFile] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.timings: dict[str, float] = {}  # seconds commit() spent: "sync", "rename"
        self._committed = False
        try:
            for name, entries in by_file.items():
                header, offsets = layouts[name]
                mapped = _MappedFile(out_dir, name, header, sum(t.nbytes for t in entries))
                self.files.append(mapped)
                for entry, start in zip(entries, offsets, strict=True):
                    self.tensors[entry.name] = mapped.tensor(entry, len(header) + start)
        except BaseException:
            self.abort()
            raise

    def commit(self) -> list[Path]:
        """Make the files durable and give them their final names. The tensors stay valid
        (the mappings follow the renamed files) until the writer is closed."""
        started = time.perf_counter()
        for mapped in self.files:
            mapped.sync()
        synced = time.perf_counter()
        self._committed = True
        paths = [mapped.rename() for mapped in self.files]
        self.timings = {"sync": synced - started, "rename": time.perf_counter() - synced}
        return paths

    def close(self) -> None:
        if not self._committed:
            self.abort()
        else:
            self._close()

    def abort(self) -> None:
        self._close()
        for mapped in self.files:
            mapped.partial.unlink(missing_ok=True)

    def _close(self) -> None:
        self.tensors.clear()  # release views into the mappings before closing them
        for mapped in self.files:
            mapped.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb_: TracebackType | None
    ) -> None:
        if kind is not None and not self._committed:
            self.abort()
        else:
            self.close()


class _MappedFile:
    """One safetensors file being received: its header written, its data mapped."""

    def __init__(self, out_dir: Path, name: str, header: bytes, data_bytes: int) -> None:
        self.final = out_dir / name
        # A fresh name, created exclusively: nothing already there (a planted symlink, a
        # stale partial) is followed, reused or overwritten.
        fd, partial = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".partial")
        self.partial = Path(partial)
        self._file = os.fdopen(fd, "r+b")
        total = len(header) + data_bytes
        try:
            self._file.write(header)
            self._file.truncate(total)
            self._map: mmap.mmap | None = mmap.mmap(self._file.fileno(), total) if total else None
        except OSError as exc:
            self._file.close()
            self.partial.unlink(missing_ok=True)
            raise NetloaderError(f"cannot lay out {total} bytes in {out_dir}: {exc}") from exc

    def tensor(self, entry: TensorEntry, offset: int) -> torch.Tensor:
        dtype = tb.dtype_from_name(entry.dtype)
        if entry.nbytes == 0 or self._map is None:
            return torch.empty(entry.shape, dtype=dtype)
        raw = torch.frombuffer(self._map, dtype=torch.uint8, count=entry.nbytes, offset=offset)
        return raw.view(dtype).reshape(entry.shape)

    def sync(self) -> None:
        if self._map is not None:
            self._map.flush()
        os.fsync(self._file.fileno())

    def rename(self) -> Path:
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        if self._map is not None:
            # A view still alive elsewhere keeps the mapping; the OS unmaps it at exit.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        if not self._file.closed:
            self._file.close()


def _header(tensors: list[TensorEntry]) -> tuple[bytes, list[int]]:
    """safetensors header: u64 length, then JSON padded with spaces to 8-byte alignment;
    and each tensor's data offset."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, position = [], 0
    for entry in tensors:
        entries[entry.name] = {
            "dtype": tb.safetensors_code(entry.dtype),
            "shape": list(entry.shape),
            "data_offsets": [position, position + entry.nbytes],
        }
        offsets.append(position)
        position += entry.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % 8)
    return len(text).to_bytes(8, "little") + text, offsets
