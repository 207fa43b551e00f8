"""safetensors checkpoints on disk: reading one (single file or sharded with an index) to
serve it, and writing one whose tensor bytes are received straight into the file."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

import torch
from safetensors.torch import load_file

from netloader import tensors as tb
from netloader.errors import NetloaderError
from netloader.manifest import Manifest

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


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


class CheckpointWriter:
    """Lays out `manifest` as a safetensors file `<dir>/model.safetensors`, maps it, and
    hands out tensors over the mapping so a pull receives straight into the file.

    The file is written under a fresh hidden name (`.model.safetensors.*.partial`) and
    renamed only by `commit()`, so an interrupted pull never leaves a file that looks
    complete.
    """

    def __init__(self, out_dir: Path, manifest: Manifest) -> None:
        self.final = out_dir / SINGLE_NAME
        out_dir.mkdir(parents=True, exist_ok=True)
        if "__metadata__" in {t.name for t in manifest.tensors}:
            raise NetloaderError("a tensor named '__metadata__' cannot be stored in safetensors")
        header, data_offsets = _header(manifest)
        total = len(header) + manifest.total_bytes
        free = shutil.disk_usage(out_dir).free
        if total > free:
            raise NetloaderError(f"{out_dir} has {free} bytes free; the model needs {total}")
        # A fresh name, created exclusively: nothing already there (a planted symlink, a
        # stale partial) is followed, reused or overwritten.
        fd, name = tempfile.mkstemp(dir=out_dir, prefix=f".{SINGLE_NAME}.", suffix=".partial")
        self.partial = Path(name)
        self._file = os.fdopen(fd, "r+b")
        try:
            self._file.write(header)
            self._file.truncate(total)
            self._map = mmap.mmap(self._file.fileno(), total) if total else None
        except OSError as exc:
            self._file.close()
            self.partial.unlink(missing_ok=True)
            raise NetloaderError(f"cannot lay out {total} bytes in {out_dir}: {exc}") from exc
        self._committed = False
        self.tensors: dict[str, torch.Tensor] = {}
        for entry, start in zip(manifest.tensors, data_offsets, strict=True):
            dtype = tb.dtype_from_name(entry.dtype)
            if entry.nbytes == 0:
                self.tensors[entry.name] = torch.empty(entry.shape, dtype=dtype)
                continue
            raw = torch.frombuffer(
                self._map, dtype=torch.uint8, count=entry.nbytes, offset=len(header) + start
            )
            self.tensors[entry.name] = raw.view(dtype).reshape(entry.shape)

    def commit(self) -> Path:
        """Make the file durable and give it its final name. The tensors stay valid (the
        mapping follows the renamed file) until the writer is closed."""
        if self._map is not None:
            self._map.flush()
        os.fsync(self._file.fileno())
        os.replace(self.partial, self.final)
        self._committed = True
        return self.final

    def close(self) -> None:
        if not self._committed:
            self.abort()
        elif not self._file.closed:
            self._close()

    def abort(self) -> None:
        self._close()
        self.partial.unlink(missing_ok=True)

    def _close(self) -> None:
        self.tensors.clear()  # release views into the mapping before closing it
        if self._map is not None:
            # A view still alive elsewhere keeps the mapping; the OS unmaps it at exit.
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        self._file.close()

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb_: TracebackType | None
    ) -> None:
        if kind is not None and not self._committed and not self._file.closed:
            self.abort()
        else:
            self.close()


def _header(manifest: Manifest) -> tuple[bytes, list[int]]:
    """safetensors header: u64 length, then JSON padded with spaces to 8-byte alignment."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offsets, position = [], 0
    for entry in manifest.tensors:
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
