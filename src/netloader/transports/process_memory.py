"""Linux primitives for reading another process's memory on the same host: the host's
boot id, the kernel-certified pid at the other end of a Unix socket, process_vm_readv, and
the Yama grant a process gives one reader.

Who may read whom is the kernel's ptrace access rule: the reader needs the same user as the
target (and the target dumpable) or CAP_SYS_PTRACE; under Yama `ptrace_scope=1` the target
must also name the reader with PR_SET_PTRACER; `ptrace_scope>=2` leaves only
CAP_SYS_PTRACE. Nothing here widens that rule beyond one named reader, for one transfer.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import socket
import struct
import sys
import threading
from array import array
from collections.abc import Iterator, Sequence
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")
PR_SET_PTRACER = 0x59616D61  # "Yama"
_UCRED = struct.Struct("3i")  # pid, uid, gid


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "process_vm_readv"):
        return None
    libc.process_vm_readv.restype = ctypes.c_ssize_t
    libc.process_vm_readv.argtypes = [
        ctypes.c_int,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.POINTER(_IoVec),
        ctypes.c_ulong,
        ctypes.c_ulong,
    ]
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return libc


_LIBC = _libc()


def unsupported() -> str | None:
    """Why this process cannot use the same-host path at all; None if it can."""
    if _LIBC is None:
        return "process_vm_readv needs Linux"
    if boot_id() is None:
        return f"{BOOT_ID} is not readable"
    return None


def boot_id() -> str | None:
    """This host's boot id (one per running kernel): equal on both sides means one host."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def yama_scope() -> int:
    """The Yama ptrace scope (0 when Yama is absent: only the classic rule applies)."""
    try:
        return int(YAMA_SCOPE.read_text().strip())
    except (OSError, ValueError):
        return 0


def peer_pid(sock: socket.socket) -> int:
    """The pid of the process at the other end of a connected Unix socket, as the kernel
    recorded it and translated into this process's pid namespace (0: not visible here)."""
    pid, _uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return int(pid)


def read(pid: int, destination: int, address: int, length: int) -> None:
    """Copy `length` bytes at `address` in process `pid` to `destination` in this one, in
    one kernel copy; OSError (with errno) if the kernel refuses or the range is not mapped."""
    assert _LIBC is not None, "check unsupported() first"
    done = 0
    while done < length:
        local = _IoVec(destination + done, length - done)
        remote = _IoVec(address + done, length - done)
        got = _LIBC.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            code = ctypes.get_errno() if got < 0 else errno.EFAULT
            raise OSError(code, f"process_vm_readv from pid {pid}: {os.strerror(code)}")
        done += got


def read_pieces(
    pid: int, destinations: Sequence[int], addresses: Sequence[int], lengths: Sequence[int]
) -> None:
    """Copy piece i (`lengths[i]` bytes at `addresses[i]` in process `pid`) to
    `destinations[i]` here, all in one kernel call (at most IOV_MAX pieces); OSError as
    `read`. A call the kernel ends early (a piece it cannot read) is finished piece by
    piece, so the error names the failing range."""
    assert _LIBC is not None, "check unsupported() first"
    count = len(lengths)
    local, remote = array("Q", bytes(16 * count)), array("Q", bytes(16 * count))
    local[0::2], remote[0::2] = array("Q", destinations), array("Q", addresses)
    local[1::2] = remote[1::2] = array("Q", lengths)
    got = _LIBC.process_vm_readv(
        pid,
        ctypes.cast(local.buffer_info()[0], ctypes.POINTER(_IoVec)),
        count,
        ctypes.cast(remote.buffer_info()[0], ctypes.POINTER(_IoVec)),
        count,
        0,
    )
    if got == sum(lengths):
        return
    done = max(got, 0)
    for destination, address, length in zip(destinations, addresses, lengths, strict=True):
        if done >= length:
            done -= length
            continue
        read(pid, destination + done, address + done, length - done)
        done = 0


_GRANT = threading.Lock()  # Yama keeps one named reader per process


@contextlib.contextmanager
def reader_allowed(pid: int) -> Iterator[None]:
    """Let process `pid` read this process's memory for the duration of the block, where
    Yama (`ptrace_scope=1`) would otherwise forbid it; elsewhere a no-op. One grant at a
    time per process: a second reader waits for the first to finish."""
    if yama_scope() != 1 or _LIBC is None:
        yield
        return
    with _GRANT:
        if _LIBC.prctl(PR_SET_PTRACER, pid, 0, 0) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"PR_SET_PTRACER {pid}: {os.strerror(code)}")
        try:
            yield
        finally:
            _LIBC.prctl(PR_SET_PTRACER, 0, 0, 0)
