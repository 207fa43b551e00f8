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

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from netloader.client import Client
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
from netloader.server import Holdings, LoadedTensors

log = logging.getLogger("netloader.vllm")

AOT_DIR = ("torch_compile_cache", "torch_aot_compile")
INDUCTOR_DIR = "inductor_cache"
ARTIFACT = "model"  # vLLM writes it once a module is compiled


@dataclass(frozen=True)
class CompileKey:
    """Where this instance's compile cache lives and what vLLM keys it on.

    root:    VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile.
    keys:    vLLM's directory name for each compiled module (its cache key).
    rank:    this worker's directory inside each, rank_<rank>_<dp rank>.
    factors: what the keys are made of, by name, to say which one differs.
    """

    root: Path
    keys: tuple[str, ...]
    rank: str
    factors: dict[str, str]

    def attributes(self) -> dict[str, str]:
        return {"compile_key": json.dumps(self._described())}

    def _described(self) -> dict[str, object]:
        return {**self.factors, "rank": self.rank, "keys": list(self.keys)}

    def differences(self, attributes: Mapping[str, str]) -> list[str]:
        """What differs between this key and the one a seed's cache was made under."""
        theirs = _offered(attributes)
        return [
            f"{name}: seed {theirs.get(name)!r}, this instance {value!r}"
            for name, value in self._described().items()
            if theirs.get(name) != value
        ]

    @classmethod
    def offered(cls, attributes: Mapping[str, str], root: Path) -> CompileKey:
        """The key a seed's cache was made under, to take it as it is into the cache root
        `root` (VLLM_CACHE_ROOT): for a node whose vLLM has not started yet, whose own
        lookup will find it only if its key is the same."""
        theirs = _offered(attributes)
        keys, rank = theirs.pop("keys", None), theirs.pop("rank", None)
        if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
            raise NetloaderError("the seed's compile key names no cache directories")
        if not isinstance(rank, str) or any(not valid_name(k) for k in [*keys, rank]):
            raise NetloaderError("the seed's compile key names a directory that is not plain")
        return cls(
            root.joinpath(*AOT_DIR), tuple(keys), rank, {k: str(v) for k, v in theirs.items()}
        )

    def directories(self) -> list[tuple[str, Path]]:
        """(name prefix in the served tree, directory) for each part of the cache."""
        return [
            (f"{key}/{part}/", self.root / key / part)
            for key in self.keys
            for part in (self.rank, INDUCTOR_DIR)
        ]


def _offered(attributes: Mapping[str, str]) -> dict[str, object]:
    try:
        offered = json.loads(attributes.get("compile_key", "{}"))
    except ValueError:
        raise NetloaderError("the seed's compile key is not valid JSON") from None
    if not isinstance(offered, dict):
        raise NetloaderError("the seed's compile key is not a JSON object")
    return offered


def compile_key(model: torch.nn.Module, vllm_config: Any) -> CompileKey | str:
    """This instance's CompileKey, or why it has no compile cache (vLLM's own
    functions make the key, so it is the directory vLLM itself will look in)."""
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
    keys = tuple(
        hashlib.sha256(str([*factors, _model_hash_key(m.forward)]).encode()).hexdigest()
        for m in compiled
    )
    parallel = vllm_config.parallel_config
    named = {
        "vllm": str(vllm.__version__),
        "torch": str(torch.__version__),
        "environment": factors[0],
        "engine config": factors[1],
        "inductor config": hashlib.sha256(str(factors[2:]).encode()).hexdigest()[:16],
    }
    root = Path(envs.VLLM_CACHE_ROOT).joinpath(*AOT_DIR)
    return CompileKey(root, keys, f"rank_{parallel.rank}_{parallel.data_parallel_index}", named)


def cache_holdings(key: CompileKey, identity: Identity) -> Callable[[], Holdings]:
    """What a seed offers when a client asks for its compile cache: the files as they are
    then (a cache is complete once each module's artifact is written)."""

    def snapshot() -> Holdings:
        missing = [
            d for _, d in key.directories() if d.name == key.rank and not (d / ARTIFACT).is_file()
        ]
        if missing:
            raise SourceUnavailable(f"no compile cache (yet) in {missing[0]}")
        files: dict[str, torch.Tensor] = {}
        try:
            for prefix, directory in key.directories():
                if directory.is_dir():
                    files.update(tree_files(directory, COMPILE_CACHE, prefix=prefix))
        except (OSError, NetloaderError) as exc:  # told to the client, who compiles itself
            raise SourceUnavailable(f"cannot offer the compile cache: {exc}") from exc
        attributes = {**identity.attributes, **key.attributes()}
        return LoadedTensors(files, Identity(identity.model, attributes=attributes))

    return snapshot


def take_compile_cache(client: Client, key: CompileKey, identity: Identity) -> str:
    """Pull a seed's compile cache into this instance's cache directory, verified, each
    part written at once (a part already there is kept); returns what happened, for the
    log. Raises NetloaderError when it cannot (the cache directory is then as it was)."""
    manifest = client.manifest(Part.COMPILE_CACHE)
    return take_offered(client, manifest, key, identity)


def take_offered(client: Client, manifest: Manifest, key: CompileKey, identity: Identity) -> str:
    """`take_compile_cache` once the seed's manifest is in hand."""
    if manifest.identity.model != identity.model:
        raise NetloaderError(f"the compile cache is for {manifest.identity.model!r}")
    differences = key.differences(dict(manifest.identity.attributes))
    if differences:
        raise NetloaderError("its compile key differs: " + "; ".join(differences))
    check_files_manifest(manifest, COMPILE_CACHE)
    prefixes = [prefix for prefix, _ in key.directories()]
    stray = [t.name for t in manifest.tensors if not t.name.startswith(tuple(prefixes))]
    if stray:
        raise NetloaderError(f"the compile cache holds {stray[0]!r}, outside its key")
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
