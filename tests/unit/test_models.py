"""netloader.testing.models: every builder is deterministic (server and client processes
build the same bytes) and gives exactly the bytes it always gave; checkpoints written
from a model read back as the same names, dtypes and shapes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from netloader.testing.models import (
    Tensors,
    all_dtypes,
    blocks,
    checkpoint_specs,
    differing,
    empty_like,
    llama_like,
    specs_of,
    transformer_like,
    write_checkpoint,
)


def digest(tensors: Tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# Digests of what tests/tensorsets.py and benchmarks/bench_core.py built before these
# builders replaced them.
PINNED: dict[str, tuple[Callable[[], Tensors], str]] = {
    "all_dtypes": (all_dtypes, "373dcc3f36365622"),
    "transformer_like": (transformer_like, "d54938efa0393396"),
    "blocks": (blocks, "d82074197eab86d1"),
    "blocks(16)": (lambda: blocks(16), "2c26e99898c2f6c7"),
    "llama_like(64 MiB)": (lambda: llama_like(64 << 20), "ade150e986c8338d"),
}


@pytest.mark.parametrize("name", sorted(PINNED))
def test_builders_give_the_bytes_they_always_gave(name: str) -> None:
    build, pinned = PINNED[name]
    assert digest(build()) == pinned
    assert not differing(build(), build())


def test_empty_like_fills_or_leaves_untouched() -> None:
    model = all_dtypes()
    filled = empty_like(model, fill=0xA5)
    assert specs_of(filled) == specs_of(model)
    assert all(t.is_contiguous() for t in filled.values())
    assert all(bool((t.reshape(-1).view(torch.uint8) == 0xA5).all()) for t in filled.values())
    assert differing(filled, model) == [n for n, t in model.items() if t.numel()]


@pytest.mark.parametrize("shards", [1, 3])
def test_checkpoint_round_trip(tmp_path: Path, shards: int) -> None:
    model = transformer_like(layers=2)
    written = write_checkpoint(tmp_path, model, shards=shards)
    if shards == 1:
        assert written.name == "model.safetensors"
        assert sorted(s.name for s in checkpoint_specs(written)) == sorted(model)
        assert set(checkpoint_specs(written)) == set(specs_of(model))
        assert not differing(load_file(written), model)
        return
    weight_map = json.loads(written.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    loaded: Tensors = {}
    for file in files:
        loaded |= load_file(tmp_path / file)
    assert sorted(weight_map) == sorted(loaded) == sorted(model)
    assert not differing(loaded, model)
