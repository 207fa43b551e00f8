"""Synthetic models for tests, benchmarks and the demo.

Every builder is deterministic: a server process and a client process that call it with
the same arguments get bit-identical tensors, so the client can check what it pulled
without the bytes ever crossing a pipe.

    expected = transformer_like()            # name -> tensor
    dest = empty_like(expected)              # what a loader has before loading
    ...pull into dest...
    assert not differing(dest, expected)

    path = write_checkpoint(tmp / "model", llama_like(1 << 30))   # a 1 GiB checkpoint
    dest = empty_like(checkpoint_specs(path))
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

Tensors = dict[str, torch.Tensor]

FLOAT8 = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]

# safetensors' dtype codes, for the ones this torch has.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name)
    for code, name in {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "U16": "uint16",
        "I16": "int16",
        "U32": "uint32",
        "I32": "int32",
        "U64": "uint64",
        "I64": "int64",
        "F16": "float16",
        "BF16": "bfloat16",
        "F32": "float32",
        "F64": "float64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
    }.items()
    if hasattr(torch, name)
}


@dataclass(frozen=True)
class TensorSpec:
    """A tensor's name, dtype and shape, without its data."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# ---- random tensors -----------------------------------------------------------------------


def random_bytes(n: int, seed: int) -> torch.Tensor:
    """`n` random bytes (uint8) from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=generator)


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype, NaNs and all (which is what bit-identical means);
    bool tensors get 0 or 1."""
    numel = math.prod(shape)
    if dtype == torch.bool:
        return (random_bytes(numel, seed) & 1).bool().reshape(shape)
    return random_bytes(numel * dtype.itemsize, seed).view(dtype).reshape(shape)


# ---- models -------------------------------------------------------------------------------


def all_dtypes() -> Tensors:
    """A matrix, a scalar and an empty tensor of every dtype (float8 where this torch has
    it), one tensor larger than several small chunks, and non-contiguous views."""
    out: Tensors = {}
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
        out[f"{name}.matrix"] = random_tensor(dtype, (33, 17), i)
        out[f"{name}.scalar"] = random_tensor(dtype, (), 100 + i)
        out[f"{name}.empty"] = random_tensor(dtype, (0, 5), 200 + i)
    # Larger than several chunks (tests use a small chunk size), odd length.
    out["large"] = random_tensor(torch.float32, (1_000_003,), 7)
    # A non-contiguous view as the served tensor.
    out["transposed"] = random_tensor(torch.float32, (64, 48), 8).t()
    out["strided"] = random_tensor(torch.bfloat16, (100, 10), 9)[::3, 1:7]
    return out


def transformer_like(layers: int = 4, width: int = 256) -> Tensors:
    """A small transformer-shaped model: an embedding, then per layer attention and MLP
    matrices (bf16) and a norm (fp32); random bits. About 6 MiB with the defaults."""
    bf16, fp32 = torch.bfloat16, torch.float32
    out: Tensors = {"embed.weight": random_tensor(bf16, (1000, width), 1)}
    for layer in range(layers):
        base = 10 * (layer + 1)
        out[f"layers.{layer}.attn.qkv"] = random_tensor(bf16, (3 * width, width), base)
        out[f"layers.{layer}.mlp.up"] = random_tensor(bf16, (4 * width, width), base + 1)
        out[f"layers.{layer}.mlp.down"] = random_tensor(bf16, (width, 4 * width), base + 2)
        out[f"layers.{layer}.norm"] = random_tensor(fp32, (width,), base + 3)
    return out


def blocks(total_mib: int = 64, count: int = 4, seed: int = 500) -> Tensors:
    """`count` flat uint8 tensors `block.0`... of `total_mib / count` MiB each: few large
    tensors, for transfers that take long enough to interrupt or to measure."""
    each = (total_mib << 20) // count
    return {f"block.{i}": random_tensor(torch.uint8, (each,), seed + i) for i in range(count)}


def experts(total_mib: int = 64, count: int = 4096, seed: int = 600) -> Tensors:
    """`count` bfloat16 tensors of `total_mib / count` MiB each, named like the experts of
    a mixture-of-experts model: many small tensors, the layout whose per-tensor costs
    matter (16 KiB each with the defaults)."""
    rows = (total_mib << 20) // count // 256
    data = random_bytes(count * rows * 256, seed).view(torch.bfloat16).reshape(count, rows, 128)
    return {f"layers.{i // 64}.experts.{i % 64}.w": data[i] for i in range(count)}


def mixed_sizes() -> Tensors:
    """Every dtype and awkward shape of `all_dtypes` (empty, scalar, odd lengths, larger
    than a chunk, non-contiguous), then 3,000 tiny tensors of 1 to 97 bytes: more than one
    chunk holds, as a mixture-of-experts checkpoint's scales and biases come."""
    out = all_dtypes()
    tiny = random_bytes(3000 * 97, 700)
    for i in range(3000):
        out[f"tiny.{i}"] = tiny[i * 97 : i * 97 + 1 + (i * 7) % 97].clone()
    return out


def llama_specs(target_bytes: int) -> list[TensorSpec]:
    """A decoder-only model's tensors (GQA attention with qkv biases, gated MLP, norms in
    fp32, embeddings in bf16, an fp32 lm_head), with layers added until `target_bytes`."""
    hidden, inter, kv, rot = 2048, 5632, 512, 64
    # Keep the vocabulary matrices under ~40% of small targets so layers still appear.
    vocab = max(256, min(32000, int(0.4 * target_bytes / (hidden * 6))))
    bf16, fp32 = torch.bfloat16, torch.float32

    def spec(name: str, dtype: torch.dtype, *shape: int) -> TensorSpec:
        return TensorSpec(name, dtype, shape)

    specs = [spec("model.embed_tokens.weight", bf16, vocab, hidden)]
    tail = [spec("model.norm.weight", fp32, hidden), spec("lm_head.weight", fp32, vocab, hidden)]
    layer = 0
    while sum(s.nbytes for s in specs + tail) < target_bytes:
        p = f"model.layers.{layer}."
        specs += [
            spec(p + "input_layernorm.weight", fp32, hidden),
            spec(p + "self_attn.q_proj.weight", bf16, hidden, hidden),
            spec(p + "self_attn.q_proj.bias", bf16, hidden),
            spec(p + "self_attn.k_proj.weight", bf16, kv, hidden),
            spec(p + "self_attn.k_proj.bias", bf16, kv),
            spec(p + "self_attn.v_proj.weight", bf16, kv, hidden),
            spec(p + "self_attn.v_proj.bias", bf16, kv),
            spec(p + "self_attn.o_proj.weight", bf16, hidden, hidden),
            spec(p + "self_attn.rotary_emb.inv_freq", fp32, rot),
            spec(p + "post_attention_layernorm.weight", fp32, hidden),
            spec(p + "mlp.gate_proj.weight", bf16, inter, hidden),
            spec(p + "mlp.up_proj.weight", bf16, inter, hidden),
            spec(p + "mlp.down_proj.weight", bf16, hidden, inter),
        ]
        layer += 1
    return specs + tail


def llama_like(target_bytes: int, seed: int = 0) -> Tensors:
    """A realistic shape and dtype mix of at least `target_bytes` (see `llama_specs`),
    filled with normal values of scale 0.02, like freshly initialised weights."""
    generator = torch.Generator().manual_seed(seed)
    return {
        s.name: torch.randn(s.shape, generator=generator, dtype=s.dtype) * 0.02
        for s in llama_specs(target_bytes)
    }


SETS: dict[str, Callable[[], Tensors]] = {
    "all_dtypes": all_dtypes,
    "transformer_like": transformer_like,
    "blocks": blocks,
    "experts": experts,
    "mixed_sizes": mixed_sizes,
}
"""The models a server process can be asked for by name (with their default arguments)."""


# ---- destinations and comparisons -----------------------------------------------------------


def specs_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def empty_like(
    model: Mapping[str, torch.Tensor] | Iterable[TensorSpec], *, fill: int | None = None
) -> Tensors:
    """Contiguous tensors of the same names, dtypes and shapes: what a loader has before
    loading. With `fill=None` their memory is untouched (its first write page-faults, as
    a just-built model's does); with a byte value, every byte is set to it (a sentinel
    shows what a pull wrote)."""
    specs = specs_of(model) if isinstance(model, Mapping) else model
    out: Tensors = {}
    for spec in specs:
        dest = torch.empty(spec.shape, dtype=spec.dtype)
        if fill is not None and dest.numel():
            dest.reshape(-1).view(torch.uint8).fill_(fill)
        out[spec.name] = dest
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, same shape and the same bytes (NaNs compare by their bits)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def differing(got: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> list[str]:
    """The names in `expected` that `got` lacks or holds other bytes for."""
    return [n for n, t in expected.items() if n not in got or not same_bytes(got[n], t)]


# ---- checkpoints --------------------------------------------------------------------------


def write_checkpoint(
    directory: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save `tensors` as `directory/model.safetensors`, or with `shards > 1` as that many
    files `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`, the way
    large checkpoints come; returns the file or the index. `metadata` defaults to
    torch's `{"format": "pt"}`."""
    directory.mkdir(parents=True, exist_ok=True)
    contiguous = {n: t.contiguous() for n, t in tensors.items()}
    meta = dict(metadata if metadata is not None else {"format": "pt"})
    if shards == 1:
        path = directory / "model.safetensors"
        save_file(contiguous, str(path), metadata=meta)
        return path
    names = list(contiguous)
    weight_map: dict[str, str] = {}
    for i in range(shards):
        part = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: contiguous[n] for n in part}, str(directory / file), metadata=meta)
        weight_map |= dict.fromkeys(part, file)
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def read_safetensors_header(path: Path) -> tuple[int, dict[str, object]]:
    """(length of the header block including its 8-byte size, the header's JSON)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header: dict[str, object] = json.loads(f.read(size))
        return 8 + size, header


def checkpoint_specs(path: Path) -> list[TensorSpec]:
    """The tensors of one safetensors file in file order, read from its header alone."""
    _, header = read_safetensors_header(path)
    entries: list[tuple[int, TensorSpec]] = []
    for name, entry in header.items():
        if name == "__metadata__" or not isinstance(entry, dict):
            continue
        spec = TensorSpec(name, SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        entries.append((entry["data_offsets"][0], spec))
    return [spec for _, spec in sorted(entries, key=lambda e: e[0])]


def perturbed_checkpoint(
    model_dir: Path, out: Path, touched: str, *, scale: float = 0.05, seed: int = 0
) -> Path:
    """A copy of the checkpoint directory `model_dir` in `out` whose floating-point tensors
    with `touched` in their name carry added noise (the next version of a model, as a
    fine-tune changes some layers); its other files are copied as they are."""
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for path in sorted(model_dir.iterdir()):
        if not path.is_file():
            continue
        if path.suffix != ".safetensors":
            shutil.copy2(path, out / path.name)
            continue
        tensors = load_file(str(path))
        for name, t in tensors.items():
            if touched in name and t.is_floating_point():
                noise = torch.randn(t.shape, generator=generator) * scale
                tensors[name] = (t.float() + noise).to(t.dtype).contiguous()
        save_file(tensors, str(out / path.name), metadata={"format": "pt"})
    return out
