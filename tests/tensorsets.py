"""Deterministic tensor sets, built identically in the server process and in the test."""

from __future__ import annotations

import torch

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]


def _random_bytes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


def _of(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype (NaNs and all, which is what bit-identical means)."""
    numel = 1
    for d in shape:
        numel *= d
    if dtype == torch.bool:
        return (_random_bytes(numel, seed) & 1).bool().reshape(shape)
    raw = _random_bytes(numel * dtype.itemsize, seed)
    return raw.view(dtype).reshape(shape)


def all_dtypes() -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    dtypes = [
        torch.float32,
        torch.bfloat16,
        torch.float16,
        torch.int8,
        torch.uint8,
        torch.int32,
        torch.int64,
        torch.bool,
        *FLOAT8,
    ]
    for i, dtype in enumerate(dtypes):
        name = str(dtype).removeprefix("torch.")
        out[f"{name}.matrix"] = _of(dtype, (33, 17), i)
        out[f"{name}.scalar"] = _of(dtype, (), 100 + i)
        out[f"{name}.empty"] = _of(dtype, (0, 5), 200 + i)
    # Larger than several chunks (tests use a small chunk size), odd length.
    out["large"] = _of(torch.float32, (1_000_003,), 7)
    # A non-contiguous view as the served tensor.
    out["transposed"] = _of(torch.float32, (64, 48), 8).t()
    out["strided"] = _of(torch.bfloat16, (100, 10), 9)[::3, 1:7]
    return out


def model_like(layers: int = 4, width: int = 256) -> dict[str, torch.Tensor]:
    """A small transformer-shaped set: matrices plus norms, bf16 and fp32."""
    out: dict[str, torch.Tensor] = {"embed.weight": _of(torch.bfloat16, (1000, width), 1)}
    for layer in range(layers):
        base = 10 * (layer + 1)
        out[f"layers.{layer}.attn.qkv"] = _of(torch.bfloat16, (3 * width, width), base)
        out[f"layers.{layer}.mlp.up"] = _of(torch.bfloat16, (4 * width, width), base + 1)
        out[f"layers.{layer}.mlp.down"] = _of(torch.bfloat16, (width, 4 * width), base + 2)
        out[f"layers.{layer}.norm"] = _of(torch.float32, (width,), base + 3)
    return out


def big(mib: int = 64) -> dict[str, torch.Tensor]:
    """A few large tensors, for transfers that take long enough to interrupt."""
    per = mib // 4
    return {f"block.{i}": _of(torch.uint8, (per << 20,), 500 + i) for i in range(4)}


SETS = {"all_dtypes": all_dtypes, "model_like": model_like, "big": big}


def empty_like_set(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous destinations of the same dtypes and shapes, filled with a sentinel."""
    out = {}
    for name, t in tensors.items():
        dest = torch.empty(t.shape, dtype=t.dtype)
        dest.view(-1).view(torch.uint8).fill_(0xA5) if dest.numel() else None
        out[name] = dest
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )
