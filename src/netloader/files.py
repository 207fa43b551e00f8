"""Files served beside the weights: a model directory's other files (config, tokenizer,
generation config: everything a node needs beside the weights, so that a node whose disk
holds nothing can start), and trees such as an engine's compile cache. Each file travels
as a 1-D uint8 tensor named by its (relative) path, so it moves in verified chunks like
any weight; both sides bound names, counts and sizes (`FileLimits`)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from netloader.errors import NetloaderError
from netloader.manifest import Manifest

log = logging.getLogger(__name__)

# Weight formats: served as the WEIGHTS part (safetensors) or not at all.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# A plain file name: no directories, nothing hidden, nothing a shell or Windows trips on.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")


@dataclass(frozen=True)
class FileLimits:
    """What a set of served files may be: how many, how large, and whether names may be
    relative paths (at most `depth` plain names) rather than plain names."""

    files: int
    file_bytes: int
    total_bytes: int
    depth: int = 1


# Tokenizers are tens of MB; anything larger is not a config.
MODEL_FILES = FileLimits(files=256, file_bytes=256 << 20, total_bytes=1 << 30)
COMPILE_CACHE = FileLimits(files=8192, file_bytes=1 << 30, total_bytes=4 << 30, depth=8)


def valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None and ".." not in name


def valid_path(path: str, depth: int = 1) -> bool:
    """A relative path of at most `depth` plain names."""
    parts = path.split("/")
    return len(parts) <= depth and all(valid_name(part) for part in parts)


def is_weight_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def model_files(directory: Path) -> dict[str, torch.Tensor]:
    """The files of `directory` (not its subdirectories) other than weights and hidden
    files, as uint8 tensors by file name, in name order. Files that break MODEL_FILES are
    left out, each with a log line; links are followed (a Hugging Face cache's files are
    links)."""
    limits = MODEL_FILES
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
            else f"it is larger than {limits.file_bytes} bytes"
            if size > limits.file_bytes
            else f"the files would exceed {limits.total_bytes} bytes"
            if total + size > limits.total_bytes
            else f"there are more than {limits.files} files"
            if len(found) >= limits.files
            else None
        )
        if why is not None:
            log.warning("netloader: not serving %s: %s", path, why)
            continue
        found[name] = _as_tensor(path.read_bytes())
        total += size
    return found


def tree_files(
    root: Path, limits: FileLimits = COMPILE_CACHE, *, prefix: str = ""
) -> dict[str, torch.Tensor]:
    """Every regular file under `root` (links are not followed), by `prefix` + its path
    relative to `root`, as uint8 tensors in path order. A tree that breaks `limits` is an
    error: a partial tree would be worse than none."""
    paths = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    if len(paths) > limits.files:
        raise NetloaderError(f"{root} holds {len(paths)} files (most: {limits.files})")
    found: dict[str, torch.Tensor] = {}
    total = 0
    for path in paths:
        name = prefix + path.relative_to(root).as_posix()
        data = path.read_bytes()
        total += len(data)
        if not valid_path(name, limits.depth) or len(data) > limits.file_bytes:
            raise NetloaderError(f"{path}: not a plain file name within bounds")
        if total > limits.total_bytes:
            raise NetloaderError(f"{root} holds more than {limits.total_bytes} bytes")
        found[name] = _as_tensor(data)
    return found


def _as_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def check_files_manifest(manifest: Manifest, limits: FileLimits = MODEL_FILES) -> None:
    """Refuse a manifest of files that names anything but plain names (or paths) and
    bounded byte strings, within `limits`."""
    if len(manifest.tensors) > limits.files:
        raise NetloaderError(
            f"the server offers {len(manifest.tensors)} files (most: {limits.files})"
        )
    if manifest.total_bytes > limits.total_bytes:
        raise NetloaderError(
            f"the server's files hold {manifest.total_bytes} bytes (most: {limits.total_bytes})"
        )
    for entry in manifest.tensors:
        if not valid_path(entry.name, limits.depth) or is_weight_file(entry.name):
            raise NetloaderError(f"the server offers a file named {entry.name!r}: refused")
        if entry.dtype != "uint8" or len(entry.shape) != 1 or entry.nbytes > limits.file_bytes:
            raise NetloaderError(f"the server's file {entry.name!r} is not a bounded byte string")


def empty_files(manifest: Manifest) -> dict[str, torch.Tensor]:
    """Buffers to receive a (checked) manifest's files into."""
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


def write_tree(target: Path, files: Mapping[str, torch.Tensor], depth: int = 8) -> bool:
    """Create the directory `target` holding `files` (by relative path), all at once:
    written into a fresh hidden directory beside it, which is then renamed. Returns
    False, leaving everything as it was, when `target` exists already."""
    for name in files:
        if not valid_path(name, depth):  # checked on receipt too; this trusts no caller
            raise NetloaderError(f"refusing to write a file named {name!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        return False
    staging = Path(
        tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    )
    try:
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "xb") as f:
                f.write(data.numpy().tobytes())
        staging.chmod(0o755)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        os.rename(staging, target)  # fails, rather than merging, if it appeared meanwhile
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if target.exists():
            return False
        raise
    return True
