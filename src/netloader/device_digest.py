"""A chunk digest that a GPU computes where the bytes are, for device-resident tensors.

xxh3 runs on the host; a chunk that stays in device memory (the CUDA IPC transport) would
have to cross to the host to be hashed. This digest is written in plain torch operations
(integer multiply, xor, shift, mask, sum), so the one function runs on any device: on the
CPU it is the reference the tests check, on a CUDA device it runs there, on the bytes as
they lie. `fused()` gives the same function compiled into one kernel (torch.compile), for
rates near the memory's; the eager form launches one kernel per operation.

Definition. The chunk's L bytes are read as n = ceil(L / 4) little-endian 32-bit words w_i
(the last one zero-padded). For each of two lanes j, with constants A_j, B_j, M_j (M_j odd,
below 2^31):

    k_i = (A_j * i + B_j) mod 2^32             a key for position i
    t_i = (w_i xor k_i) * M_j                  exact: below 2^63
    low_j  = sum_i (t_i mod 2^32) + K_j * L    exact sums: no wrap-around up to 2^26 words
    high_j = sum_i floor(t_i / 2^32)

and the digest is low_0, high_0, low_1, high_1 in hex (16 digits each, mod 2^64). Every sum
is exact integer arithmetic, so the order the device adds in does not change it: CPU and
GPU give the same digest.

What it detects: any change confined to one 4-byte word, always (x -> (x xor k) * M mod
2^32 is a bijection, and the sum is exact); a different length, always; words swapped or
moved, flipped bits in several words, zeroed or stale ranges: unless the changes cancel in
all four sums at once, which for such accidents is very unlikely (each word's term depends
on its position through k_i). What it does not: it is not cryptographic. The function is
public and close to linear, so anyone who can change the bytes can also make changes that
cancel. It guards against corruption (a bad copy, a stale buffer, a flipped bit, the wrong
memory), as the transports' job is; authenticity comes from the authenticated control
connection that delivers the manifest.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import torch

log = logging.getLogger(__name__)

DEVICE_DIGEST_ALGORITHM = "nl-words32-4x64-v1"  # carried in the manifest's "device_digest"
DEVICE_DIGEST_HEX = 64  # hex digits of one digest
MAX_WORDS = 1 << 30  # i * A_j stays below 2^62; a chunk (MAX_CHUNK_BYTES) has 2^26 words
BLOCK_WORDS = 1 << 24  # words per pass: bounds the int64 temporaries (128 MiB each)
_MASK32 = 0xFFFFFFFF
# (A_j, B_j, M_j, K_j): fixed forever for this algorithm name (odd multipliers).
_LANES = (
    (0x9E3779B1, 0x7F4A7C15, 0x5BD1E995, 0x2545F491),
    (0x85EBCA77, 0x165667B1, 0x27D4EB2F, 0x61C88647),
)

Sums = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def lane_sums(words: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """The four partial sums (low_0, high_0, low_1, high_1) of 32-bit `words` (int32, any
    device) at `position` (int64, the same shape): an int64 tensor of 4, on that device."""
    w = words.to(torch.int64) & _MASK32
    out = []
    for a, b, m, _ in _LANES:
        key = (position * a + b) & _MASK32
        t = (w ^ key) * m
        out.append((t & _MASK32).sum())
        out.append((t >> 32).sum())
    return torch.stack(out)


def as_words(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`data` (flat uint8, any device) as whole 32-bit words, and its zero-padded tail word
    (empty when the length is a multiple of 4). A view where `data` starts 4-byte aligned;
    else one copy."""
    if data.dim() != 1 or data.dtype != torch.uint8:
        raise ValueError("device_digest needs a flat uint8 tensor")
    whole = data.numel() // 4 * 4
    body = data[:whole]
    if body.storage_offset() % 4 or not body.is_contiguous():
        body = body.clone()
    rest = data[whole:]
    tail = torch.zeros(4 if rest.numel() else 0, dtype=torch.uint8, device=data.device)
    tail[: rest.numel()] = rest
    return body.view(torch.int32), tail.view(torch.int32)


def digest_sums(data: torch.Tensor, sums: Sums = lane_sums) -> torch.Tensor:
    """The digest's four sums of `data` (flat uint8) as an int64 tensor on its device,
    without waiting for the device (`finish` turns them into the digest). `sums`: the
    per-block function (`fused()` for the compiled one)."""
    body, tail = as_words(data)
    n = body.numel() + tail.numel()
    if n > MAX_WORDS:
        raise ValueError(f"device_digest covers at most {4 * MAX_WORDS} bytes, not {data.numel()}")
    total = torch.zeros(4, dtype=torch.int64, device=data.device)
    for first in range(0, body.numel(), BLOCK_WORDS):
        block = body[first : first + BLOCK_WORDS]
        position = torch.arange(first, first + block.numel(), dtype=torch.int64, device=data.device)
        total += sums(block, position)
    if tail.numel():
        position = torch.full((1,), body.numel(), dtype=torch.int64, device=data.device)
        total += lane_sums(tail, position)
    return total


def finish(sums: Sequence[int], length: int) -> str:
    """The digest text from the four sums (as Python ints) of `length` bytes."""
    values = (
        sums[0] + _LANES[0][3] * length,
        sums[1],
        sums[2] + _LANES[1][3] * length,
        sums[3],
    )
    return "".join(f"{v % (1 << 64):016x}" for v in values)


def device_digest(data: torch.Tensor, sums: Sums = lane_sums) -> str:
    """The device digest of `data`'s bytes (flat uint8, any device), computed on its device
    (waits for it)."""
    return finish(digest_sums(data, sums).tolist(), data.numel())


def packed(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The bytes of `parts` (uint8 tensors on one device: a chunk's pieces, a strided one as
    its runs) back to back, flat: a view of a lone contiguous one, else one copy. Empty
    parts are left out (an empty tensor's bytes may be a host tensor)."""
    flat = [part.contiguous().reshape(-1) for part in parts if part.numel()]
    if len(flat) == 1:
        return flat[0]
    if not flat:
        return torch.empty(0, dtype=torch.uint8)
    return torch.cat(flat)


def chunk_digest(parts: Sequence[torch.Tensor], sums: Sums = lane_sums) -> str:
    """The device digest of a chunk whose pieces are `parts` (see `packed`)."""
    return device_digest(packed(parts), sums)


_FUSED: list[Compiled] = []
_FUSED_LOCK = threading.Lock()


def fused() -> Compiled:
    """`lane_sums` compiled into one kernel (torch.compile), falling back to the eager form
    for good at its first failure (no compiler here, say). Both give the same sums (the GPU
    tests check it). The first call compiles (seconds)."""
    with _FUSED_LOCK:
        if not _FUSED:
            _FUSED.append(Compiled())
        return _FUSED[0]


def ready(device: torch.device) -> Sums:
    """The compiled sums once they are compiled, else the eager ones, starting the
    compilation in the background (once) on a small tensor on `device`: a transfer never
    waits for the compiler, and later chunks get the fused kernel. The digests are the
    same either way. Off CUDA devices: the eager ones."""
    if device.type != "cuda":
        return lane_sums
    compiled = fused()
    if compiled.warm:
        return compiled
    compiled.warm_up(device)
    return lane_sums


class Compiled:
    """`lane_sums` under torch.compile; the first call (which compiles) one thread at a
    time, so concurrent pulls do not compile it at once."""

    def __init__(self) -> None:
        self.compiled: Sums | None = None
        self._first = threading.Lock()
        self._warm = False
        self._warming = False
        try:
            self.compiled = torch.compile(lane_sums, dynamic=True)
        except Exception as exc:
            self._give_up(exc)

    @property
    def warm(self) -> bool:
        """Compiled, and the compiling call is done."""
        return self._warm and self.compiled is not None

    def warm_up(self, device: torch.device) -> None:
        """Compile in a background thread (once), with a small tensor on `device`."""
        with _FUSED_LOCK:
            if self._warming or self.compiled is None:
                return
            self._warming = True

        def compile_now() -> None:
            words = torch.zeros(8, dtype=torch.int32, device=device)
            self(words, torch.arange(8, dtype=torch.int64, device=device))

        threading.Thread(target=compile_now, name="netloader-digest-compile", daemon=True).start()

    def _give_up(self, exc: BaseException) -> None:
        log.warning("netloader: device digest not compiled (%s); using the eager form", exc)
        self.compiled = None

    def __call__(self, words: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if not self._warm:
            with self._first:
                out = self._call(words, position)
                self._warm = True
                return out
        return self._call(words, position)

    def _call(self, words: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                return self.compiled(words, position)
            except Exception as exc:
                self._give_up(exc)
        return lane_sums(words, position)
