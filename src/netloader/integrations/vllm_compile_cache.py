"""SHARE_COMPILE_CACHE: a vLLM seed serves its torch.compile cache beside its weights, and a
new instance takes it into its own cache directory before vLLM looks, so that vLLM's own
lookup finds a hit and the instance skips compiling what its seed compiled.

vLLM (with torch >= 2.10) keeps one AOT-compiled artifact per compiled module under
`VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/<key>/rank_<r>_<dp>/`, next to the
inductor cache it ran with (`<key>/inductor_cache/`). `<key>` is vLLM's own hash of the
environment, the engine configuration, the inductor configuration and the module's code.
Both sides compute it with vLLM's own functions; a client whose key differs takes nothing
and says which part differs.

A compile cache is code the client will run (vLLM unpickles the artifact), so a client
takes one only from a source that proved the shared secret or a certificate it trusts.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from netloader.client import Client
from netloader.config import NetloaderConfig
from netloader.errors import NetloaderError, SourceUnavailable
from netloader.files import (
    COMPILE_CACHE,
    check_files_manifest,
    empty_files,
    tree_files,
    valid_name,
    write_tree,
)
from netloader.manifest import Identity, Manifest
from netloader.protocol import Part
from netloader.ranks import client_for
from netloader.server import Holdings, LoadedTensors

log = logging.getLogger("netloader.vllm")

AOT_DIR = ("torch_compile_cache", "torch_aot_compile")
INDUCTOR_DIR = "inductor_cache"
ARTIFACT = "model"  # vLLM writes it once a module is compiled
MODEL_INFO_DIR = "modelinfos"  # beside torch_compile_cache in VLLM_CACHE_ROOT
ANY_PATH = "<the model directory>"  # stands in for it in the compared engine configuration


@dataclass(frozen=True)
class CompileKey:
    """What vLLM keys this instance's compile cache on, and where the cache lives.

    root:    VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile.
    rank:    this worker's directory in each key's, rank_<rank>_<dp rank>.
    factors: what vLLM's keys are made of, by name, as computed when the model is loaded
             (vLLM completes its configuration later, so the keys themselves are known
             only once it has compiled: equal factors here make equal keys then).
    keys:    vLLM's directory name for each compiled module, once known.
    model_path: the model directory vLLM was started with (told, not compared).
    """

    root: Path
    rank: str
    factors: dict[str, str]
    keys: tuple[str, ...] = ()
    model_path: str = ""

    def attributes(self) -> dict[str, str]:
        described = {
            **self.factors,
            "rank": self.rank,
            "keys": list(self.keys),
            "model path": self.model_path,
        }
        return {"compile_key": json.dumps(described)}

    def differences(self, attributes: Mapping[str, str]) -> list[str]:
        """What differs between this key and the one a seed's cache was made under."""
        theirs = _offered(attributes)
        mine = {**self.factors, "rank": self.rank}
        return [
            f"{name}: seed {theirs.get(name)!r}, this instance {value!r}"
            for name, value in mine.items()
            if theirs.get(name) != value
        ]

    def placed_as(self, attributes: Mapping[str, str]) -> CompileKey:
        """This key with the directory names of a seed's cache (checked to be plain)."""
        offered = _offered(attributes)
        keys = offered.get("keys")
        if not (isinstance(keys, list) and keys and all(isinstance(k, str) for k in keys)):
            raise NetloaderError("the seed's compile key names no cache directories")
        if any(not valid_name(k) for k in keys):
            raise NetloaderError("the seed's compile key names a directory that is not plain")
        return replace(self, keys=tuple(keys), model_path=str(offered.get("model path", "")))

    @classmethod
    def offered(cls, attributes: Mapping[str, str], root: Path) -> CompileKey:
        """A seed's key as it is, to take its cache into the cache root `root`
        (VLLM_CACHE_ROOT) of a node whose vLLM has not started yet: vLLM will use it
        only if its own key turns out the same."""
        theirs = _offered(attributes)
        rank = theirs.pop("rank", None)
        theirs.pop("keys", None)
        theirs.pop("model path", None)
        if not isinstance(rank, str) or not valid_name(rank):
            raise NetloaderError("the seed's compile key names a rank that is not plain")
        factors = {k: str(v) for k, v in theirs.items()}
        return cls(root.joinpath(*AOT_DIR), rank, factors).placed_as(attributes)

    def directories(self) -> list[tuple[str, Path]]:
        """(name prefix in the served tree, directory) for each part of the cache: per
        key, this rank's artifacts and the inductor cache; and vLLM's model-inspection
        cache (JSON, read before the engine starts: it saves a new node seconds when
        `netloader pull --compile-cache` brings it before vLLM starts)."""
        return [
            *(
                (f"{key}/{part}/", self.root / key / part)
                for key in self.keys
                for part in (self.rank, INDUCTOR_DIR)
            ),
            (f"{MODEL_INFO_DIR}/", self.root.parent.parent / MODEL_INFO_DIR),
        ]


def _offered(attributes: Mapping[str, str]) -> dict[str, object]:
    try:
        offered = json.loads(attributes.get("compile_key", "{}"))
    except ValueError:
        raise NetloaderError("the seed's compile key is not valid JSON") from None
    if not isinstance(offered, dict):
        raise NetloaderError("the seed's compile key is not a JSON object")
    return offered


@dataclass(frozen=True)
class VllmKeys:
    """How this instance's vLLM names its cache directories: per compiled module, a hash of
    vLLM's factors (final only when it compiles) and the module's code."""

    vllm_config: Any
    modules: tuple[str, ...]  # vLLM's hash key of each compiled module's forward

    def __call__(self, factors: list[str] | None = None) -> tuple[str, ...]:
        """The directory names, from `factors` (default: vLLM's factors now)."""
        if factors is None:
            from vllm.compilation import caching

            factors = caching.aot_compile_hash_factors(self.vllm_config)
        return tuple(
            hashlib.sha256(str([*factors, module]).encode()).hexdigest() for module in self.modules
        )


def compile_key(model: torch.nn.Module, vllm_config: Any) -> tuple[CompileKey, VllmKeys] | str:
    """This instance's CompileKey, with vLLM's directory names once it has compiled; or why
    this instance has no compile cache. vLLM's own functions make both, so the directories
    are the ones vLLM itself uses."""
    import vllm.envs as envs
    from vllm.compilation.caching import aot_compile_hash_factors
    from vllm.compilation.decorators import _model_hash_key

    import vllm

    compiled = [m for m in model.modules() if getattr(m, "do_not_compile", True) is False]
    if not compiled:
        return "this instance does not compile (--enforce-eager or compilation off)"
    if not envs.VLLM_USE_AOT_COMPILE or envs.VLLM_DISABLE_COMPILE_CACHE:
        return "vLLM's AOT compile cache is off (VLLM_USE_AOT_COMPILE, VLLM_DISABLE_COMPILE_CACHE)"

    factors = aot_compile_hash_factors(vllm_config)
    modules = tuple(_model_hash_key(m.forward) for m in compiled)
    named = {
        "vllm": str(vllm.__version__),
        "torch": str(torch.__version__),
        "environment": str(factors[0]),
        "engine config": _engine_config_hash(vllm_config),
        "inductor config": hashlib.sha256(str(factors[2:]).encode()).hexdigest()[:16],
        "modules": ",".join(module[:16] for module in modules),
    }
    parallel = vllm_config.parallel_config
    root = Path(envs.VLLM_CACHE_ROOT).joinpath(*AOT_DIR)
    rank = f"rank_{parallel.rank}_{parallel.data_parallel_index}"
    key = CompileKey(root, rank, named, model_path=str(vllm_config.model_config.model))
    return key, VllmKeys(vllm_config, modules)


def _engine_config_hash(vllm_config: Any, model_path: str = ANY_PATH) -> str:
    """vLLM's hash of the engine configuration with the model's directory (its
    `ModelConfig.model`; the tokenizer's and the served name are already left out) taken
    to be `model_path`: by default left out."""
    model_config = copy.copy(vllm_config.model_config)
    object.__setattr__(model_config, "model", model_path)
    config = copy.copy(vllm_config)
    object.__setattr__(config, "model_config", model_config)
    return str(config.compute_hash())


_to_follow: list[tuple[CompileKey, VllmKeys]] = []  # taken caches, until vLLM names its keys


def follow_own_keys(placed: CompileKey, own: VllmKeys) -> None:
    """Have vLLM find a cache taken under the seed's directory names (`placed`) under its own
    names: when vLLM computes its key (as it compiles), the seed's directories for this rank
    move to this instance's, if with the seed's model directory this instance's key would
    be the seed's (the only difference allowed)."""
    from vllm.compilation import caching

    _to_follow.append((placed, own))
    if hasattr(caching.aot_compile_hash_factors, "__wrapped__"):
        return
    computed = caching.aot_compile_hash_factors

    @functools.wraps(computed)
    def factors_then_follow(vllm_config: Any) -> list[str]:
        factors: list[str] = computed(vllm_config)
        for placed, own in _to_follow:
            if own.vllm_config is not vllm_config or not placed.model_path:
                continue
            # This instance's keys had its model been at the seed's path: the seed's own
            # keys, unless its final configuration differs in more than the path.
            at_seed = [factors[0], _engine_config_hash(vllm_config, placed.model_path)]
            try:
                move_to_own_keys(placed, own(factors), own([*at_seed, *factors[2:]]))
            except OSError as exc:  # vLLM compiles itself; never fail its compile here
                log.warning("netloader: could not move the compile cache: %s", exc)
        return factors

    caching.aot_compile_hash_factors = factors_then_follow


def move_to_own_keys(
    placed: CompileKey, own_keys: tuple[str, ...], at_seed_path: tuple[str, ...]
) -> None:
    """Move this rank's part of a cache placed under the seed's keys, and the inductor
    cache, to `own_keys` (one per compiled module); a part already there is kept.
    `at_seed_path`: this instance's keys had its model been at the seed's path; a module
    whose key then still differs from the seed's is left where it is (vLLM compiles it)."""
    for seed_key, own_key, same in zip(placed.keys, own_keys, at_seed_path, strict=True):
        if same != seed_key:
            log.warning(
                "netloader: the seed's compile cache %s is left where it is: this instance's "
                "final configuration differs from the seed's in more than the model's "
                "directory (vLLM compiles itself)",
                seed_key,
            )
            continue
        moved = []
        for part in (placed.rank, INDUCTOR_DIR):
            source, target = placed.root / seed_key / part, placed.root / own_key / part
            if seed_key == own_key or not source.is_dir() or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):  # another rank moved it first
                source.rename(target)
                moved.append(part)
        with contextlib.suppress(OSError):  # empty once every rank's part has moved
            (placed.root / seed_key).rmdir()
        if moved:
            log.info(
                "netloader: moved the seed's compile cache %s (%s) to %s, this instance's own "
                "key (the model's directory is %s on the seed)",
                seed_key,
                ", ".join(moved),
                own_key,
                placed.model_path or "unknown",
            )


def cache_holdings(
    key: CompileKey, identity: Identity, keys: Callable[[], tuple[str, ...]] | None = None
) -> Callable[[], Holdings]:
    """What a seed offers when a client asks for its compile cache: the files as they are
    then, under vLLM's directory names then (`keys()`; default `key.keys`). A cache is
    complete once each module's artifact is written."""

    def snapshot() -> Holdings:
        now = key if keys is None else replace(key, keys=keys())
        missing = [
            d for _, d in now.directories() if d.name == now.rank and not (d / ARTIFACT).is_file()
        ]
        if missing or not now.keys:
            raise SourceUnavailable(
                f"no compile cache (yet) in {missing[0] if missing else now.root}"
            )
        files: dict[str, torch.Tensor] = {}
        try:
            for prefix, directory in now.directories():
                if directory.is_dir():
                    files.update(tree_files(directory, COMPILE_CACHE, prefix=prefix))
        except (OSError, NetloaderError) as exc:  # told to the client, who compiles itself
            raise SourceUnavailable(f"cannot offer the compile cache: {exc}") from exc
        attributes = {**identity.attributes, **now.attributes()}
        return LoadedTensors(files, Identity(identity.model, attributes=attributes))

    return snapshot


def take_compile_cache(
    client: Client, key: CompileKey, identity: Identity, own: VllmKeys | None = None
) -> str:
    """Pull a seed's compile cache into this instance's cache directory, verified, each
    part written at once (a part already there is kept); returns what happened, for the
    log. With `own`, vLLM finds it under its own key (`follow_own_keys`). Raises
    NetloaderError when it cannot (the cache directory is then as it was)."""
    manifest = client.manifest(Part.COMPILE_CACHE)
    return take_offered(client, manifest, key, identity, own)


def take_offered(
    client: Client,
    manifest: Manifest,
    key: CompileKey,
    identity: Identity,
    own: VllmKeys | None = None,
) -> str:
    """`take_compile_cache` once the seed's manifest is in hand."""
    if manifest.identity.model != identity.model:
        raise NetloaderError(f"the compile cache is for {manifest.identity.model!r}")
    differences = key.differences(manifest.identity.attributes)
    if differences:
        raise NetloaderError("its compile key differs: " + "; ".join(differences))
    key = key.placed_as(manifest.identity.attributes)
    check_files_manifest(manifest, COMPILE_CACHE)
    prefixes = [prefix for prefix, _ in key.directories()]
    stray = [t.name for t in manifest.tensors if not t.name.startswith(tuple(prefixes))]
    if stray:
        raise NetloaderError(f"the compile cache holds {stray[0]!r}, outside its key")
    offered = [
        (prefix, directory)
        for prefix, directory in key.directories()
        if any(t.name.startswith(prefix) for t in manifest.tensors)
    ]
    if all(directory.is_dir() for _, directory in offered):  # taken before vLLM started
        said = f"found the compile cache in place in {key.root}, key {','.join(key.keys)}"
    else:
        said = _write_offered(client, manifest, key)
    if own is not None:
        follow_own_keys(key, own)
    return said


def _write_offered(client: Client, manifest: Manifest, key: CompileKey) -> str:
    files = empty_files(manifest)
    client.load_into(files, manifest.identity, within=manifest, part=Part.COMPILE_CACHE)
    written, kept = 0, 0
    for prefix, directory in key.directories():
        part = {n.removeprefix(prefix): t for n, t in files.items() if n.startswith(prefix)}
        if not part:
            continue
        if write_tree(directory, part, COMPILE_CACHE.depth):
            written += len(part)
        else:
            kept += 1
    total = sum(t.numel() for t in files.values())
    return (
        f"took the compile cache ({len(files)} files, {total} bytes) into {key.root}, key "
        f"{','.join(key.keys)}: {written} files written"
        + (f", {kept} parts already there kept" if kept else "")
    )


def take_before_vllm_starts(config: NetloaderConfig, cache_root: Path) -> None:
    """SHARE_COMPILE_CACHE in vLLM's API server, before it inspects the model: each SOURCE
    entry's compile cache, vLLM's model-inspection cache included, into `cache_root`
    (VLLM_CACHE_ROOT) under the seed's directory names, as `netloader pull --compile-cache`
    does. Nothing here decides that vLLM uses it: each worker compares its own key's
    factors with the seed's before it does (`take_offered` finds the cache in place).
    Failures are logged; the workers then try again."""
    if not config.share_compile_cache or not config.authenticates_sources():
        return  # without trust, each worker says why it compiles itself
    for entry in config.source:
        try:
            client = client_for(config, entry.sources)
            manifest = client.manifest(Part.COMPILE_CACHE)
            key = CompileKey.offered(manifest.identity.attributes, cache_root)
            identity = Identity(config.model) if config.model else manifest.identity
            said = take_offered(client, manifest, key, identity)
            log.info("netloader: rank %d, before vLLM starts: %s", entry.device_id, said)
        except NetloaderError as exc:
            log.warning(
                "netloader: rank %d takes no compile cache before vLLM starts (its worker "
                "tries again): %s",
                entry.device_id,
                exc,
            )
