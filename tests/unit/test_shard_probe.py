"""The shard probe: a dry run of a `load_weights` built the way tensor-parallel engines
build theirs (vLLM's column- and row-parallel loaders, a vocabulary shard, a fused qkv)
says which rows of each checkpoint tensor one rank keeps; anything it cannot follow is
pulled whole, and the model comes out of the dry run bound to its own memory."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from netloader.integrations.shard_probe import probe_shards
from netloader.manifest import Identity, build_manifest

TP_SIZE, TP_RANK = 2, 1
CHUNK = 1024  # bytes: every float32 [64, 16] tensor (4 KiB) spans 4 chunks


class TinyParallelModel(torch.nn.Module):
    """Rank TP_RANK of a 2-way tensor-parallel model, loading a full checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Parameter(torch.zeros(64 // TP_SIZE, 16))  # column parallel
        self.down = torch.nn.Parameter(torch.zeros(16, 64 // TP_SIZE))  # row parallel
        self.qkv = torch.nn.Parameter(torch.zeros(2 * 64 // TP_SIZE, 16))  # q and k fused
        self.embed = torch.nn.Parameter(torch.zeros(40, 16))  # 64 rows, padded shard of 40
        self.odd = torch.nn.Parameter(torch.zeros(16, 64))  # stored transposed
        self.norm = torch.nn.Parameter(torch.zeros(16))  # replicated, one chunk

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set()
        for name, w in weights:
            if name == "up":
                shard = self.up.shape[0]
                self.up.data.copy_(w.narrow(0, TP_RANK * shard, shard))
            elif name == "down":
                shard = self.down.shape[1]
                self.down.data.copy_(w.narrow(1, TP_RANK * shard, shard))
            elif name in ("q", "k"):
                shard = 64 // TP_SIZE
                target = self.qkv.data.narrow(0, 0 if name == "q" else shard, shard)
                target.copy_(w[TP_RANK * shard : (TP_RANK + 1) * shard])
            elif name == "embed":
                part = w.narrow(0, 32 * TP_RANK, 32)
                self.embed[: part.shape[0]].data.copy_(part)
            elif name == "odd":
                self.odd.data.copy_(w.t().contiguous())
            elif name == "norm":
                self.norm.data.copy_(w)
            loaded.add(name)
        return loaded


def checkpoint() -> dict[str, torch.Tensor]:
    shapes = {
        "up": (64, 16),
        "down": (16, 64),
        "q": (64, 16),
        "k": (64, 16),
        "embed": (64, 16),
        "odd": (64, 16),
        "norm": (16,),
    }
    return {name: torch.randn(shape) for name, shape in shapes.items()}


def test_a_dry_run_finds_the_rows_each_rank_keeps_and_pulls_the_rest_whole() -> None:
    ckpt = checkpoint()
    manifest = build_manifest(Identity("m"), ckpt, CHUNK)
    model = TinyParallelModel()
    before = {name: p.data_ptr() for name, p in model.named_parameters()}

    plan = probe_shards(model.load_weights, manifest, lambda name: True, model)

    rows = [((32, 64), (0, 16))]
    assert plan.parts == {
        "up": rows,
        "q": rows,
        "k": rows,
        "embed": rows,
        "down": [((0, 16), (32, 64))],
    }
    assert plan.whole == {"odd": "used in a way the probe does not follow"}
    assert "norm" not in plan.parts and "norm" not in plan.whole  # one chunk: whole anyway
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_the_planned_rows_are_all_the_real_load_reads() -> None:
    """Feeding the real load only the planned parts (NaN elsewhere) gives the model what
    the full checkpoint would: the plan covers everything the loader keeps."""
    ckpt = checkpoint()
    manifest = build_manifest(Identity("m"), ckpt, CHUNK)
    model = TinyParallelModel()
    plan = probe_shards(model.load_weights, manifest, lambda name: True, model)

    def partial() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in ckpt.items():
            if name in plan.parts:
                holey = torch.full_like(tensor, float("nan"))
                for (r0, r1), (c0, c1) in plan.parts[name]:
                    holey[r0:r1, c0:c1] = tensor[r0:r1, c0:c1]
                tensor = holey
            yield name, tensor

    model.load_weights(partial())
    reference = TinyParallelModel()
    reference.load_weights(ckpt.items())
    for (name, got), want in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(got, want), name


def test_a_dry_run_that_fails_pulls_everything_whole() -> None:
    ckpt = checkpoint()
    manifest = build_manifest(Identity("m"), ckpt, CHUNK)
    model = TinyParallelModel()

    def reads_a_value(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _, w in weights:
            if float(w.reshape(-1)[0]) > 100:  # a loader that looks at the data
                raise AssertionError

    plan = probe_shards(reads_a_value, manifest, lambda name: True, model)
    assert plan.parts == {}
    assert set(plan.whole) == {"up", "down", "q", "k", "embed", "odd"}
    assert all(why.startswith("the dry run failed") for why in plan.whole.values())


def test_a_re_bound_parameter_is_bound_back() -> None:
    ckpt = checkpoint()
    manifest = build_manifest(Identity("m"), ckpt, CHUNK)
    model = TinyParallelModel()
    original = model.up.data

    def rebinds(weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, w in weights:
            if name == "up":
                model.up.data = w[:32]

    probe_shards(rebinds, manifest, lambda name: True, model)
    assert model.up.device.type == "cpu"
    assert model.up.data_ptr() == original.data_ptr()


@pytest.mark.parametrize("skipped", ["up", "q"])
def test_tensors_not_wanted_are_not_fed(skipped: str) -> None:
    ckpt = checkpoint()
    manifest = build_manifest(Identity("m"), ckpt, CHUNK)
    seen: list[str] = []
    probe_shards(
        lambda weights: seen.extend(n for n, _ in weights),
        manifest,
        lambda name: name != skipped,
        TinyParallelModel(),
    )
    assert skipped not in seen and len(seen) == len(ckpt) - 1
