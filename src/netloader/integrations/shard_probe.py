"""Which part of each checkpoint tensor an engine's `load_weights` keeps, found by a dry
run: the consumer is fed stand-ins (meta tensors, no memory) for the tensors that span
several chunks, and the stand-ins record the part of themselves that reaches a parameter.
Tensor-parallel weight loaders cut their shard with `narrow` (or a slice): a rank of a
column-parallel layer keeps a range of rows, of a row-parallel layer a range of columns,
and only the chunks holding that part need to move. A stand-in used in any way the probe
does not follow (transposed, concatenated, read as a number) marks its tensor as needed
whole; a dry run that fails marks them all.

The dry run writes into the model's parameters (the small tensors are fed as zeros, and
parameters a loader re-binds are bound back afterwards); the real load that follows
overwrites them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from netloader.manifest import Manifest
from netloader.tensors import dtype_from_name

log = logging.getLogger("netloader.shards")

Box = tuple[tuple[int, int], ...]  # per dimension, the [start, stop) a use covers
Consumer = Callable[[Iterable[tuple[str, torch.Tensor]]], Any]

# Ops through which a stand-in still stands for the same elements.
_SAME_ELEMENTS = {
    torch.Tensor.contiguous,
    torch.Tensor.detach,
    torch.Tensor.clone,
    torch.Tensor.to,
    torch.Tensor.cpu,
}
_WRITES = {torch.Tensor.copy_, torch.Tensor.__setitem__}


@dataclass
class ShardPlan:
    """What a dry run found: for each probed tensor it can cut, the parts it needs (boxes
    of rows, or of rows and columns: `stream_tensors`' parts); and why the others are
    needed whole, for the log."""

    parts: dict[str, list[Box]] = field(default_factory=dict)
    whole: dict[str, str] = field(default_factory=dict)  # name -> why

    def summary(self) -> str:
        reasons: dict[str, int] = {}
        for why in self.whole.values():
            reasons[why] = reasons.get(why, 0) + 1
        parts = [f"{len(self.parts)} tensors by the part this rank keeps"]
        parts += [f"{count} whole ({why})" for why, count in sorted(reasons.items())]
        return ", ".join(parts)


class _Uses:
    """What became of each stand-in: the boxes of it copied into the model, or why it is
    needed whole."""

    def __init__(self) -> None:
        self.boxes: dict[str, list[Box]] = {}
        self.whole: dict[str, str] = {}

    def used(self, probe: _StandIn) -> None:
        if probe.box is None:
            self.whole.setdefault(probe.root, "used in a way the probe does not follow")
        else:
            self.boxes.setdefault(probe.root, []).append(probe.box)

    def lost(self, probe: _StandIn, why: str) -> None:
        self.whole.setdefault(probe.root, why)


class _StandIn(torch.Tensor):
    """A meta tensor standing for (part of) checkpoint tensor `root`: `box` is the part,
    None once an op made its elements something else."""

    root: str
    box: Box | None
    uses: _Uses

    @staticmethod
    def make(meta: torch.Tensor, root: str, box: Box | None, uses: _Uses) -> _StandIn:
        probe = torch.Tensor._make_subclass(_StandIn, meta)
        probe.root, probe.box, probe.uses = root, box, uses
        return probe

    @classmethod
    def __torch_function__(
        cls,
        func: Any,
        types: Any,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> Any:
        kwargs = dict(kwargs or {})
        probes = _stand_ins((args, kwargs))
        if func in _WRITES and not isinstance(args[0], _StandIn):
            for probe in probes:  # what reaches a parameter: recorded, not written
                probe.uses.used(probe)
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*args, **kwargs)
        if not isinstance(result, torch.Tensor) or not probes:
            return result
        # Derived from one stand-in by an op the probe follows: a box of the same root;
        # otherwise still a stand-in (so that it is not written), needed whole if used.
        source = probes[0]
        box = _follow(func, args, kwargs, source) if len(probes) == 1 else None
        return _StandIn.make(result, source.root, box, source.uses)


def _stand_ins(value: Any) -> list[_StandIn]:
    """The stand-ins among an op's arguments (nested in lists, tuples and dicts)."""
    if isinstance(value, _StandIn):
        return [value]
    if isinstance(value, list | tuple):
        return [p for item in value for p in _stand_ins(item)]
    if isinstance(value, dict):
        return _stand_ins(list(value.values()))
    return []


def _follow(
    func: Any, args: Sequence[Any], kwargs: Mapping[str, Any], source: _StandIn
) -> Box | None:
    """The box of `func(source, ...)`'s result within the root, where the probe can tell."""
    box = source.box
    if box is None or args[0] is not source:
        return None
    if func in _SAME_ELEMENTS:
        return box
    if func in (torch.Tensor.narrow, torch.narrow):
        named = [kwargs[k] for k in ("dim", "start", "length") if k in kwargs]
        dim, start, length = (*args[1:], *named)
        return _narrowed(box, int(dim), int(start), int(length))
    if func is torch.Tensor.__getitem__:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if len(index) > len(box) or not all(
            isinstance(s, slice) and s.step in (None, 1) for s in index
        ):
            return None
        for dim, s in enumerate(index):
            size = box[dim][1] - box[dim][0]
            start, stop, _ = s.indices(size)
            box = _narrowed(box, dim, start, max(stop - start, 0))
        return box
    return None


def _narrowed(box: Box, dim: int, start: int, length: int) -> Box:
    dim %= len(box)
    base = box[dim][0]
    return (*box[:dim], (base + start, base + start + length), *box[dim + 1 :])


def probe_shards(
    consume: Consumer,
    manifest: Manifest,
    wanted: Callable[[str], bool],
    model: torch.nn.Module,
) -> ShardPlan:
    """Dry-run `consume` (e.g. `model.load_weights`) over `manifest`'s tensors that
    `wanted` accepts, and say which part (rows, or rows and columns) of each tensor
    spanning several chunks it keeps.

    consume:  takes an iterable of (name, tensor), as an engine's `load_weights` does.
    manifest: the checkpoint's manifest (its chunk plan decides which tensors are worth
              probing: one that fits in a chunk moves whole anyway).
    wanted:   which tensor names the real load will be fed.
    model:    the module `consume` fills; any parameter it re-binds is bound back.
    """
    uses = _Uses()
    probed = {  # name -> shape: the tensors a rank could pull part of
        entry.name: entry.shape
        for i, entry in enumerate(manifest.tensors)
        if entry.shape and len(manifest.chunks_of(i)) > 1 and wanted(entry.name)
    }

    def stand_ins() -> Iterator[tuple[str, torch.Tensor]]:
        for entry in manifest.tensors:
            if not wanted(entry.name):
                continue
            dtype = dtype_from_name(entry.dtype)
            if entry.name not in probed:
                yield entry.name, torch.zeros(entry.shape, dtype=dtype)
                continue
            meta = torch.empty(entry.shape, dtype=dtype, device="meta")
            box = tuple((0, n) for n in entry.shape)
            yield entry.name, _StandIn.make(meta, entry.name, box, uses)

    plan = ShardPlan()
    bound = {
        (module, name): (param, param.data)
        for module in model.modules()
        for name, param in module._parameters.items()
        if param is not None
    }
    try:
        consume(stand_ins())
    except Exception as exc:  # any failure of the dry run means "whole"
        log.info("netloader: the shard probe's dry run failed (%s); pulling tensors whole", exc)
        plan.whole = dict.fromkeys(probed, f"the dry run failed: {type(exc).__name__}")
        return plan
    finally:
        for (module, name), (param, data) in bound.items():
            if module._parameters.get(name) is not param:
                module._parameters[name] = param
            if param.device != data.device or param.data_ptr() != data.data_ptr():
                param.data = data
    for name, shape in probed.items():
        boxes = uses.boxes.get(name, [])
        if name in uses.whole:
            plan.whole[name] = uses.whole[name]
        elif not boxes:
            plan.whole[name] = "not seen reaching a parameter"
        elif any(b[2:] != tuple((0, n) for n in shape[2:]) for b in boxes):
            plan.whole[name] = "sharded along a dimension beyond 1"
        else:
            plan.parts[name] = sorted(set(b[:2] for b in boxes))
    return plan
