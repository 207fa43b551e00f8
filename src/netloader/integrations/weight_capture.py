"""What an inference engine's instance serves after it has loaded: the parameters as they
were *before* post-processing (which may repack, quantize or empty them), kept by
reference where post-processing replaces them, or copied where INT8_CACHE asks.

Engine-neutral (no vLLM import), so it is tested on plain torch modules.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from netloader.config import NetloaderConfig
from netloader.manifest import Identity, Manifest, build_manifest


@dataclass(frozen=True)
class Capture:
    identity: Identity
    tensors: dict[str, torch.Tensor]  # what will be served: references, or cached copies
    manifest: Manifest  # digests taken at capture time
    cached: frozenset[str]  # names served from a copy


def capture(
    params: Mapping[str, torch.Tensor], identity: Identity, config: NetloaderConfig
) -> Capture:
    """Call right after loading, before post-processing. INT8_CACHE=no keeps references
    (no copy); dram copies the parameters INT8_CACHE_NAME selects (all when unset) to host
    memory; hbm keeps those copies on the parameters' own device."""
    tensors = {name: t.detach() for name, t in params.items()}
    cached = set()
    if config.int8_cache != "no":
        for name, tensor in params.items():
            if selected(name, config.int8_cache_name):
                device = torch.device("cpu") if config.int8_cache == "dram" else tensor.device
                tensors[name] = tensor.detach().to(device, copy=True)
                cached.add(name)
    return Capture(identity, tensors, build_manifest(identity, tensors), frozenset(cached))


def selected(name: str, patterns: tuple[str, ...] | None) -> bool:
    """INT8_CACHE_NAME: a parameter is selected by any pattern that is a substring of its
    name or a shell-style wildcard matching it; no patterns selects all."""
    if patterns is None:
        return True
    return any(p in name or fnmatch.fnmatchcase(name, p) for p in patterns)


def share_equal(captured: Capture, others: Mapping[str, torch.Tensor]) -> tuple[Capture, list[str]]:
    """`captured` with each tensor that equals the one of the same name in `others` (same
    dtype, shape, device and values) replaced by that one, and the names replaced.

    For a speculative draft and its target: vLLM drops an MTP draft's embedding and lm_head
    (loaded from the target's checkpoint) right after loading and gives the draft the
    target's modules. Served from the draft's own capture, those copies would stay alive
    (2.5 GB for a 152k vocabulary at hidden size 4096 in bf16); served from the target's
    equal tensors, they are freed."""
    tensors = dict(captured.tensors)
    shared = []
    for name, mine in captured.tensors.items():
        theirs = others.get(name)
        if (
            theirs is not None
            and theirs is not mine
            and (theirs.dtype, theirs.shape, theirs.device) == (mine.dtype, mine.shape, mine.device)
            and torch.equal(theirs, mine)
        ):
            tensors[name] = theirs
            shared.append(name)
    if not shared:
        return captured, []
    return replace(captured, tensors=tensors, cached=captured.cached - set(shared)), shared


def check_intact(captured: Capture) -> str | None:
    """Call after post-processing. None if every kept tensor still holds the bytes that
    were loaded, else the reason this instance must not serve (naming the fix)."""
    before = captured.manifest
    after = build_manifest(  # compared by xxh3 alone
        captured.identity,
        captured.tensors,
        before.chunk_bytes,
        before.column_tiles,
        device_digests=False,
    )
    changed = captured.manifest.tensor_names(
        [
            n
            for n, (a, b) in enumerate(zip(captured.manifest.digests, after.digests, strict=True))
            if a != b
        ]
    )
    if not changed:
        return None
    return (
        f"post-processing modified {len(changed)} parameters in place "
        f"(e.g. {', '.join(changed[:3])}), so this instance no longer holds the bytes a new "
        f"instance must load; start it with INT8_CACHE=dram (or hbm) to keep copies"
    )


def kept_bytes(captured: Capture, live: Mapping[str, torch.Tensor]) -> int:
    """Memory the capture holds beyond the running model: copies, and originals that
    post-processing replaced (the model no longer references them)."""
    return sum(
        t.numel() * t.element_size()
        for name, t in captured.tensors.items()
        if name in captured.cached or not _same_memory(t, live.get(name))
    )


def _same_memory(a: torch.Tensor, b: torch.Tensor | None) -> bool:
    return b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape
