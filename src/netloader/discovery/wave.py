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
fallbacks, and the seeds last. A production fleet would keep the same records in its
service registry (etcd, Consul, Kubernetes endpoints) instead of a directory.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from netloader.errors import UsageError

MAX_MEMBERS = 100_000


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
        with os.fdopen(fd, "w") as f:
            f.write(f"{address}\n")
        try:
            position = len(list(folder.glob("[0-9]*.txt")))
            while position < MAX_MEMBERS:
                try:
                    os.link(tmp, folder / f"{position:05d}.txt")
                    return position
                except FileExistsError:
                    position += 1
            raise UsageError(f"wave {folder} is full ({MAX_MEMBERS} members)")
        finally:
            os.unlink(tmp)

    def leave(self, position: int) -> None:
        """Remove the record of the member at `position` (it failed, or stopped serving), so
        later members do not pick it."""
        (self.folder / f"{position:05d}.txt").unlink(missing_ok=True)

    def member(self, position: int) -> str | None:
        return _read(self.folder / f"{position:05d}.txt")

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


MAX_RECORD_BYTES = 512  # "host:port\n" with room to spare


def _read(path: Path) -> str | None:
    """A record's text, if it is a small regular file; anything else (a symlink to
    /dev/zero, a FIFO, a directory, an oversized or undecodable file) is no record. Never
    blocks and never reads more than MAX_RECORD_BYTES."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_RECORD_BYTES:
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
