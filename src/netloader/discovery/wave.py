"""Discovery for a scale-out wave, without listing every address by hand.

A wave shares one directory (a shared volume, NFS, or a local folder on one host):

    seed-0.txt            a seed's OUTPUT_PREFIX file (prefix "DIR/seed-"; "DIR/seed-b-"
                          for a second seed), holding "host:port" for rank 0
    rank0/00000.txt       new instances of rank 0, in the order they joined
    rank0/00001.txt ...
    seed-0.draft.txt      the same for speculative-decoding draft models (kind ".draft")
    rank0.draft/00000.txt ...

Each new instance claims the next position atomically (a hard link never replaces an
existing name), writing the address its relay server listens on. Its sources are then
its parent in a tree of the given fan-out (1: a chain), the parent's ancestors as
fallbacks, and the seeds last. A fleet without a shared filesystem keeps the same
records in a Redis registry instead (netloader.discovery.registry).

Liveness: a member holds an exclusive flock on its record for as long as it is in the
wave; the kernel drops the lock when the process dies, however it dies, so a record that
nobody holds is stale and is skipped (Linux emulates flock across nodes on NFS). Seed
files are the seed system's plain OUTPUT_PREFIX files and carry no liveness.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from netloader.errors import UsageError

MAX_MEMBERS = 100_000
DRAFT = ".draft"  # the kind of a speculative-decoding draft model's wave

# The records this process holds (path -> the descriptor whose flock keeps them live).
_held: dict[Path, int] = {}
_held_lock = threading.Lock()


@dataclass(frozen=True)
class Wave:
    directory: Path
    rank: int = 0
    fanout: int | None = 1  # None: no relaying, every member pulls from the seeds
    kind: str = ""  # ".draft": the wave of speculative-decoding draft models

    @property
    def folder(self) -> Path:
        return self.directory / f"rank{self.rank}{self.kind}"

    def seeds(self) -> list[str]:
        """Addresses of the seeds for this rank, from their OUTPUT_PREFIX files."""
        pattern = re.compile(rf"seed(.*\D)?{self.rank}{re.escape(self.kind)}\.txt")
        names = sorted(
            p.name for p in self.directory.glob("seed*.txt") if pattern.fullmatch(p.name)
        )
        return [a for a in (_read(self.directory / n) for n in names) if a]

    def join(self, address: str) -> int:
        """Claim the next position for an instance serving at `address`."""
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".join-")
        kept = False
        try:
            os.write(fd, f"{address}\n".encode())
            fcntl.flock(fd, fcntl.LOCK_EX)  # held until this member leaves, or dies
            position = len(list(folder.glob("[0-9]*.txt")))
            while position < MAX_MEMBERS:
                try:
                    os.link(tmp, self._record(position))
                except FileExistsError:
                    position += 1
                    continue
                with _held_lock:
                    _held[self._record(position)] = fd
                kept = True
                return position
            raise UsageError(f"wave {folder} is full ({MAX_MEMBERS} members)")
        finally:
            os.unlink(tmp)
            if not kept:
                os.close(fd)

    def leave(self, position: int) -> None:
        """Remove the record of the member at `position` (it failed, or stopped serving), so
        later members do not pick it."""
        self._record(position).unlink(missing_ok=True)
        self.release(position)

    def release(self, position: int) -> None:
        """Let this process's record at `position` go stale (as if the process had died):
        later members skip it."""
        with _held_lock:
            fd = _held.pop(self._record(position), None)
        if fd is not None:
            os.close(fd)

    def member(self, position: int) -> str | None:
        """The address of the live member at `position`; None if there is none, or its
        record is stale (no process holds it)."""
        return _read(self._record(position), live=True)

    def members(self) -> dict[int, str]:
        """Every live member's address, by position."""
        found: dict[int, str] = {}
        for path in sorted(self.folder.glob("[0-9]*.txt")):
            address = _read(path, live=True)
            if address is not None and path.stem.isdigit():
                found[int(path.stem)] = address
        return found

    def _record(self, position: int) -> Path:
        return self.folder / f"{position:05d}.txt"

    def parent(self, position: int) -> int | None:
        """Position of the member that `position` pulls from; None: the seeds."""
        if self.fanout is None:
            return None
        parent = position // self.fanout - 1  # a heap with the seeds at its root
        return parent if parent >= 0 else None

    def sources(self, position: int) -> list[str]:
        """Whom the member at `position` pulls from, in order: its parent, the parent's
        ancestors (fallbacks if the parent fails), then the seeds."""
        chain: list[str] = []
        ancestor = self.parent(position)
        while ancestor is not None:
            address = self.member(ancestor)
            if address:
                chain.append(address)
            ancestor = self.parent(ancestor)
        return chain + self.seeds()


@dataclass(frozen=True)
class Entry:
    """One live record of a wave directory, for `netloader peers --wave`."""

    role: str  # "seed" or "member"
    rank: int
    kind: str
    address: str
    position: int | None = None


def listing(directory: Path) -> list[Entry]:
    """The seeds and live members in `directory`, every rank and kind."""
    entries: list[Entry] = []
    seed_name = re.compile(rf"seed(?:.*\D)?(\d+)({re.escape(DRAFT)})?\.txt")
    for path in sorted(directory.glob("seed*.txt")):
        match = seed_name.fullmatch(path.name)
        address = _read(path) if match else None
        if match and address:
            entries.append(Entry("seed", int(match[1]), match[2] or "", address))
    folder_name = re.compile(rf"rank(\d+)({re.escape(DRAFT)})?")
    for folder in sorted(directory.glob("rank*")):
        match = folder_name.fullmatch(folder.name)
        if match and folder.is_dir():
            wave = Wave(directory, rank=int(match[1]), kind=match[2] or "")
            for position, address in wave.members().items():
                entries.append(Entry("member", wave.rank, wave.kind, address, position))
    return entries


MAX_RECORD_BYTES = 512  # "host:port\n" with room to spare


def _read(path: Path, *, live: bool = False) -> str | None:
    """A record's text, if it is a small regular file (and, with `live`, one that a
    process holds locked); anything else (a symlink to /dev/zero, a FIFO, a directory, an
    oversized or undecodable file, a dead member's record) is no record. Never blocks and
    never reads more than MAX_RECORD_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
            return None
        if live and not _locked(fd):
            return None
        data = os.read(fd, MAX_RECORD_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    try:
        return data.decode("ascii").strip() or None
    except UnicodeDecodeError:
        return None


def _locked(fd: int) -> bool:
    """Whether some process holds the flock of the file open as `fd`."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return True  # a filesystem without locks: cannot tell, so trust it as before
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
