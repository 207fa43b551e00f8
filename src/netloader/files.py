"""A model directory's other files (config, tokenizer, generation config: everything a
node needs beside the weights), served as the FILES part so that a node whose disk holds
nothing can start. Each file travels as a 1-D uint8 tensor named by its file name, so it
moves in verified chunks like any weight; both sides bound names and sizes."""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from netloader.errors import NetloaderError
from netloader.manifest import Manifest

log = logging.getLogger(__name__)

# Weight formats: served as the WEIGHTS part (safetensors) or not at all.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
MAX_FILE_BYTES = 256 << 20  # tokenizers are tens of MB; anything larger is not a config
MAX_FILES_BYTES = 1 << 30
MAX_FILES = 256
# A plain file name: no directories, nothing hidden, nothing a shell or Windows trips on.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and ".." not in name


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def model_files(directory: Path) -> dict[str, torch.Tensor]:
    """The files of `directory` (not its subdirectories) other than weights and hidden
    files, as uint8 tensors by file name, in name order. Files that break a bound are left
    out, each with a log line; links are followed (a Hugging Face cache's files are links)."""
    found: dict[str, torch.Tensor] = {}
    total = 0
    for path in sorted(directory.iterdir()):
        name = path.name
        if is_weight_file(name) or name.startswith(".") or not path.is_file():
            continue  # hidden files are a tool's (a download stamp, a lock), not the model's
        size = path.stat().st_size
        why = (
            "its name is not a plain file name"
            if not valid_name(name)
            else f"it is larger than {MAX_FILE_BYTES} bytes"
            if size > MAX_FILE_BYTES
            else f"the files would exceed {MAX_FILES_BYTES} bytes"
            if total + size > MAX_FILES_BYTES
            else f"there are more than {MAX_FILES} files"
            if len(found) >= MAX_FILES
            else None
        )
        if why is not None:
            log.warning("netloader: not serving %s: %s", path, why)
            continue
        data = path.read_bytes()
        found[name] = (
            torch.frombuffer(bytearray(data), dtype=torch.uint8)
            if data
            else torch.empty(0, dtype=torch.uint8)
        )
        total += size
    return found


def check_files_manifest(manifest: Manifest) -> None:
    """Refuse a FILES manifest that names anything but a bounded set of plain files."""
    if len(manifest.tensors) > MAX_FILES:
        raise NetloaderError(f"the server offers {len(manifest.tensors)} files (most: {MAX_FILES})")
    if manifest.total_bytes > MAX_FILES_BYTES:
        raise NetloaderError(
            f"the server's files hold {manifest.total_bytes} bytes (most: {MAX_FILES_BYTES})"
        )
    for entry in manifest.tensors:
        if not valid_name(entry.name) or is_weight_file(entry.name):
            raise NetloaderError(f"the server offers a file named {entry.name!r}: refused")
        if entry.dtype != "uint8" or len(entry.shape) != 1 or entry.nbytes > MAX_FILE_BYTES:
            raise NetloaderError(f"the server's file {entry.name!r} is not a bounded byte string")


def empty_files(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Buffers to receive a (checked) FILES manifest's files into."""
    return {t.name: torch.empty(t.nbytes, dtype=torch.uint8) for t in manifest.tensors}


def write_files(directory: Path, files: Mapping[str, torch.Tensor]) -> list[Path]:
    """Write each file into `directory` atomically (a fresh hidden name, then a rename):
    nothing already there is followed, and no file is ever seen half-written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, data in files.items():
        if not valid_name(name):  # checked on receipt too; this writer trusts no caller
            raise NetloaderError(f"refusing to write a file named {name!r}")
        fd, partial = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data.numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(partial, 0o644)
            os.replace(partial, directory / name)
        except BaseException:
            Path(partial).unlink(missing_ok=True)
            raise
        written.append(directory / name)
    return written
