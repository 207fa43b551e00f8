"""Tensors as bytes: dtype names on the wire, and zero-copy byte views of tensor memory."""

from __future__ import annotations

import ctypes
import sys
from typing import Any

import torch

# Wire name -> (torch dtype, safetensors dtype code). Only these may appear in a manifest.
_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
}
for _name, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e8m0fnu", "F8_E8M0"),
):
    if hasattr(torch, _name):
        _DTYPES[_name] = (getattr(torch, _name), _code)

_NAME_OF = {dtype: name for name, (dtype, _) in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by netloader") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name][0]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}") from None


def known_dtypes() -> tuple[str, ...]:
    return tuple(_DTYPES)


def is_known_dtype(name: str) -> bool:
    return name in _DTYPES


def itemsize(name: str) -> int:
    return dtype_from_name(name).itemsize


def safetensors_code(name: str) -> str:
    return _DTYPES[name][1]


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable view of a contiguous CPU tensor's bytes (no copy). The caller keeps
    `tensor` alive for as long as the view is used."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    return memory_at(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def owned_view(tensor: torch.Tensor) -> memoryview:
    """A view of a contiguous CPU uint8 tensor's bytes that keeps the tensor alive (for a
    temporary copy, which nothing else holds)."""
    array: Any = tensor.numpy()  # the view holds the array, the array the tensor
    return memoryview(array).cast("B")


def memory_at(address: int, length: int) -> memoryview:
    """A writable view of `length` bytes of this process's memory at `address` (no copy;
    the caller keeps that memory alive and mapped while the view is used)."""
    if not length:
        return memoryview(bytearray())
    view: memoryview = _memory_view(address, length, _PYBUF_WRITE)
    return view


def flat_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's memory as a 1-D uint8 tensor (a view when contiguous)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)


_PAGE = 4096
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def prefault(tensor: torch.Tensor) -> None:
    """`prefault_range` over a CPU tensor's memory (a no-op for other devices)."""
    if tensor.device.type == "cpu":
        prefault_range(tensor.data_ptr(), tensor.numel() * tensor.element_size())


def prefault_range(start: int, size: int) -> None:
    """Map every page of [start, start + size), writable, in one call, unless it already is.

    A socket receive into never-touched memory takes one page fault per 4 KiB inside the
    kernel's copy; populating the range first is faster (README, "How it works"). On memory
    already mapped the same call is pure cost, so a page in the middle of the range is
    probed first (mincore): mapped means the range was written before (a reload), and it
    is left alone. Best effort: a no-op where unsupported."""
    if size < 2 * _PAGE or _libc is None:
        return
    middle = (start + size // 2) & ~(_PAGE - 1)
    resident = ctypes.c_ubyte(0)
    probe = _libc.mincore(ctypes.c_void_p(middle), ctypes.c_size_t(_PAGE), ctypes.byref(resident))
    if probe == 0 and resident.value & 1:
        return
    page_start = start & ~(_PAGE - 1)
    _libc.madvise(
        ctypes.c_void_p(page_start),
        ctypes.c_size_t(start + size - page_start),
        _MADV_POPULATE_WRITE,
    )


def address_of(buffer: bytearray) -> int:
    """The address of a bytearray's memory (valid while it is neither resized nor freed)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer)) if buffer else 0


def advise_huge_pages_at(start: int, size: int) -> None:
    """Ask Linux to back [start, start + size) of (not yet touched) host memory with 2 MiB
    pages.

    Receiving into freshly allocated memory is bound by page faults, not by the network:
    one fault per 4 KiB page. With transparent huge pages in `madvise` mode (a common
    default) this cuts the faults 512-fold. Best effort: a no-op where unsupported."""
    if size < 2 * _HUGE_PAGE or _libc is None:
        return
    aligned = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
    length = (start + size - aligned) & ~(_HUGE_PAGE - 1)
    if length > 0:
        _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(length), _MADV_HUGEPAGE)


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
    except OSError:
        return None


_libc = _load_libc()
_PYBUF_WRITE = 0x200
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memory_view.restype = ctypes.py_object
