"""vLLM loading from checkpoint-format sources (`netloader serve MODEL_DIR`), whatever
this instance's parallel layout: the checkpoint tensors this rank needs are streamed,
verified, through the model's own `load_weights`, which shards, fuses and casts them as
it does from disk. Then a stricter check than vLLM's own that every parameter was
written, so that a checkpoint lacking a tensor falls back instead of loading silently."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import torch

from netloader.checkpoint import directory_fingerprint
from netloader.client import stream_tensors
from netloader.endpoint import Endpoint
from netloader.errors import NetloaderError
from netloader.integrations.shard_probe import Box, probe_shards
from netloader.manifest import Identity, Manifest
from netloader.ranks import client_for
from netloader.tensors import dtype_from_name

log = logging.getLogger("netloader.vllm")


def load_from_checkpoints(
    model: torch.nn.Module,
    model_config: Any,
    identity: Identity,
    loader: Any,
    checkpoints: list[tuple[Endpoint, Manifest]],
) -> str | None:
    """Stream the checkpoint tensors this rank needs through `model.load_weights`, which
    shards and fuses them for this instance's layout, whatever the source's; None on
    success, else why not."""
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    source, manifest = checkpoints[0]
    offered = manifest.identity
    if offered.model != identity.model:
        return f"checkpoint source {source} serves {offered.model!r}, not {identity.model!r}"
    mine, theirs = checkpoint_config(model_config), offered.attributes.get("config")
    if mine is not None and theirs is not None and mine != theirs:
        return (
            f"checkpoint source {source} holds a model of another configuration (config "
            f"fingerprint {theirs}, this instance's {mine})"
        )
    started = time.perf_counter()
    tensors, pulled = [0], list[int]()  # list.append is atomic: receiving threads add

    def on_this_stage(name: str) -> bool:  # pipeline stages skip the others' layers
        return not is_pp_missing_parameter(name, model)

    parts = _shard_parts(model, manifest, on_this_stage, identity)

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        client = client_for(loader.config, [s for s, _ in checkpoints])
        stream = stream_tensors(
            client, manifest, wanted=on_this_stage, parts=parts, progress=pulled.append
        )
        for name, tensor in stream:
            tensors[0] += 1
            yield name, tensor

    poisoned = _poison(model, loader)
    try:
        loaded = cast(Any, model).load_weights(counted())
        unloaded = _not_loaded(model, loaded, poisoned, loader)
    except BaseException:
        _unpoison(poisoned)
        raise
    if unloaded:
        _unpoison(poisoned)
        return (
            f"checkpoint source {source} lacks tensors this model needs: parameters "
            f"{', '.join(unloaded[:5])}{' ...' if len(unloaded) > 5 else ''} were not loaded"
        )
    log.info(
        "netloader: loaded %d checkpoint tensors, %d bytes from %s through the model's "
        "load_weights in %.3f s for tp rank %d/%d, pp rank %d/%d, verified",
        tensors[0],
        sum(pulled),
        ", ".join(str(s) for s, _ in checkpoints),
        time.perf_counter() - started,
        identity.tp_rank,
        identity.tp_size,
        identity.pp_rank,
        identity.pp_size,
    )
    return None


def _shard_parts(
    model: torch.nn.Module,
    manifest: Manifest,
    wanted: Callable[[str], bool],
    identity: Identity,
) -> dict[str, list[Box]]:
    """The part of each checkpoint tensor this tensor-parallel rank keeps (found by a dry
    run of `load_weights`); the tensors it does not name are pulled whole."""
    if identity.tp_size == 1:
        return {}
    plan = probe_shards(cast(Any, model).load_weights, manifest, wanted, model)
    for entry in manifest.tensors:  # the NaN check after loading covers floating point only
        if entry.name in plan.parts and not dtype_from_name(entry.dtype).is_floating_point:
            del plan.parts[entry.name]
            plan.whole[entry.name] = "not floating point, so bytes read unpulled would not show"
    log.info(
        "netloader: tp rank %d/%d pulls %s",
        identity.tp_rank,
        identity.tp_size,
        plan.summary(),
    )
    return plan.parts


def _poison(model: torch.nn.Module, loader: Any) -> dict[str, torch.Tensor]:
    """Fill the floating-point parameters a checkpoint must provide with NaN, so that any
    part `load_weights` leaves unwritten shows (e.g. a fused qkv_proj whose checkpoint
    lacks q_proj). Those a checkpoint need not carry (KV-cache scales, whatever vLLM's own
    check exempts) keep the values the model was built with."""
    exempt: set[str] = set()
    with contextlib.suppress(ValueError):  # it adds the exempt names, then complains
        loader.default.track_weights_loading(model, exempt, quantized=True)
    poisoned = {
        name: p.detach()
        for name, p in model.named_parameters()
        if name not in exempt and p.is_floating_point() and p.numel() > 0
    }
    for tensor in poisoned.values():
        tensor.fill_(float("nan"))
    return poisoned


def _unpoison(poisoned: dict[str, torch.Tensor]) -> None:
    """Zero what `_poison` filled, so the default loader starts from fresh-looking memory."""
    for tensor in poisoned.values():
        tensor.zero_()


def _not_loaded(
    model: torch.nn.Module, loaded: set[str] | None, poisoned: dict[str, torch.Tensor], loader: Any
) -> list[str]:
    """Parameters `load_weights` did not fill: not among those it says it loaded (vLLM's
    own check, in its strict form: only KV-cache scales and online quantization exempt),
    or still holding NaN somewhere."""
    try:
        loader.default.track_weights_loading(model, loaded, quantized=True)
    except ValueError:
        assert loaded is not None
        return sorted({name for name, _ in model.named_parameters()} - loaded)
    return [name for name, tensor in poisoned.items() if bool(torch.isnan(tensor).any())]


def checkpoint_config(model_config: Any) -> str | None:
    """The fingerprint of this instance's config.json, as a served checkpoint's is made."""
    try:
        return directory_fingerprint(Path(str(model_config.model)))
    except NetloaderError:  # unreadable: the server's fingerprint cannot be confirmed
        return None
