"""A compile cache served beside the weights (SHARE_COMPILE_CACHE), over real sockets,
without vLLM: a seed's cache tree taken into another cache root verified and all at
once; refused when its key differs; and, when its bytes are corrupted or cut off on the
way, the client's cache directory left exactly as it was."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import netloader
from netloader import (
    Client,
    NetloaderConfig,
    NetloaderError,
    Server,
    SourceUnavailable,
    TransferError,
)
from netloader.integrations.vllm_compile_cache import (
    ARTIFACT,
    CompileKey,
    cache_holdings,
    move_to_own_keys,
    take_before_vllm_starts,
    take_compile_cache,
)
from netloader.manifest import Identity
from netloader.server import LoadedTensors
from support.servers import MakeProxy, run_cli

IDENTITY = Identity("tiny", attributes={"vllm": "0.32.0"})
FACTORS = {"vllm": "0.32.0", "torch": "2.13.0", "environment": "e", "engine config": "c"}
SECRET = b"the compile cache test secret"


def key(cache_root: Path, **factors: str) -> CompileKey:
    """A key for the VLLM_CACHE_ROOT `cache_root`."""
    root = cache_root / "torch_compile_cache" / "torch_aot_compile"
    return CompileKey(root, "rank_0_0", {**FACTORS, **factors}, ("k" * 64,))


def tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def seed_key(tmp_path: Path) -> CompileKey:
    """A seed's cache: the module's artifact (1 MiB, several chunks), the inductor cache."""
    seed = key(tmp_path / "seed")
    rank = seed.root / seed.keys[0] / seed.rank
    (rank / "backbone").mkdir(parents=True)
    (rank / ARTIFACT).write_bytes(bytes(range(256)) * 4096)
    (rank / "backbone" / "vllm_compile_cache.py").write_text("{}")
    inductor = seed.root / seed.keys[0] / "inductor_cache" / "fxgraph" / "ab"
    inductor.mkdir(parents=True)
    (inductor / "entry").write_bytes(b"compiled")
    info = seed.root.parent.parent / "modelinfos"  # VLLM_CACHE_ROOT/modelinfos
    info.mkdir()
    (info / "vllm-model_executor-models-llama-LlamaForCausalLM.json").write_text("{}")
    return seed


@pytest.fixture
def seed(seed_key: CompileKey) -> Iterator[Server]:
    weights = LoadedTensors({"w": torch.ones(4)}, IDENTITY)
    with Server(weights, secret=SECRET, compile_cache=cache_holdings(seed_key, IDENTITY)) as s:
        yield s


def test_a_seeds_cache_is_taken_whole_and_kept_when_there(
    seed: Server, seed_key: CompileKey, tmp_path: Path
) -> None:
    mine = key(tmp_path / "client")
    said = take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    assert f"key {'k' * 64}: 4 files written" in said, said
    assert tree(mine.root) == tree(seed_key.root)
    info = "modelinfos/vllm-model_executor-models-llama-LlamaForCausalLM.json"
    assert tree(mine.root.parent.parent)[info] == b"{}"
    (mine.root / seed_key.keys[0] / "inductor_cache").rename(tmp_path / "gone")
    again = take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    assert "1 files written, 2 parts already there kept" in again
    assert tree(mine.root) == tree(seed_key.root)
    assert not list(mine.root.rglob(".*partial"))
    # Every part there (taken before vLLM started): nothing moves.
    there = take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    assert there == f"found the compile cache in place in {mine.root}, key {'k' * 64}", there


def test_a_cache_placed_under_the_seeds_key_moves_to_this_instances_key(
    seed: Server, tmp_path: Path
) -> None:
    """The model at another path: vLLM's own key differs from the seed's, and each rank's
    part moves there (the inductor cache once, by whichever rank comes first)."""
    mine = key(tmp_path / "client")
    take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    placed = mine.placed_as({"compile_key": json.dumps({"keys": ["k" * 64]})})
    (mine.root / ("k" * 64) / "rank_1_0").mkdir()  # another rank's part, placed beside
    taken = tree(mine.root / ("k" * 64))
    # With the seed's path this instance's key would not be the seed's: nothing moves.
    move_to_own_keys(placed, ("o" * 64,), ("x" * 64,))
    assert tree(mine.root / ("k" * 64)) == taken and not (mine.root / ("o" * 64)).exists()
    move_to_own_keys(placed, ("o" * 64,), placed.keys)
    assert tree(mine.root / ("o" * 64)) == taken
    assert sorted(p.name for p in (mine.root / ("k" * 64)).iterdir()) == ["rank_1_0"]
    move_to_own_keys(replace(placed, rank="rank_1_0"), ("o" * 64,), placed.keys)
    assert sorted(p.name for p in mine.root.iterdir()) == ["o" * 64]
    assert (mine.root / ("o" * 64) / "rank_1_0").is_dir()


def test_the_model_directory_is_told_but_not_compared(seed: Server, tmp_path: Path) -> None:
    mine = replace(key(tmp_path / "client"), model_path="/elsewhere/tiny")
    said = take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    assert "4 files written" in said


def test_vllms_api_server_takes_the_cache_before_it_inspects_the_model(
    seed: Server, seed_key: CompileKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the plugin runs in vLLM's API server: every SOURCE entry's cache into the cache
    root, under the seed's directory names; only with a secret (or TLS_CA)."""
    root = tmp_path / "vllm-cache"
    source = [{"device_id": 0, "sources": [str(seed.address)]}]
    config = NetloaderConfig.load({"SOURCE": source, "SHARE_COMPILE_CACHE": True, "MODEL": "tiny"})
    take_before_vllm_starts(config, root)
    assert not root.exists()  # no secret: a compile cache is code
    monkeypatch.setenv("NETLOADER_SECRET", SECRET.decode())
    take_before_vllm_starts(replace(config, model="other"), root)
    assert not root.exists()  # another model's cache
    take_before_vllm_starts(config, root)
    assert tree(root / "torch_compile_cache" / "torch_aot_compile") == tree(seed_key.root)
    assert (root / "modelinfos").is_dir()


def test_a_different_key_takes_nothing_and_names_the_difference(
    seed: Server, tmp_path: Path
) -> None:
    mine = key(tmp_path / "client", **{"engine config": "other"})
    with pytest.raises(NetloaderError, match="engine config: seed 'c', this instance 'other'"):
        take_compile_cache(Client([seed.address], secret=SECRET), mine, IDENTITY)
    assert not mine.root.exists()


@pytest.mark.parametrize("fault", ["flip", "cut"])
def test_corrupted_or_cut_off_leaves_the_cache_directory_as_it_was(
    seed: Server, proxy: MakeProxy, tmp_path: Path, fault: str
) -> None:
    mine = key(tmp_path / "client")
    mine.root.mkdir(parents=True)
    (mine.root / "unrelated").write_text("mine")
    before = tree(mine.root.parent.parent)
    at = 600_000  # inside the artifact's bytes: past the handshake and the manifest
    bad = proxy(str(seed.address), **({"flip_at": at} if fault == "flip" else {"cut_at": at}))
    client = Client([bad.address], secret=SECRET, timeouts=netloader.Timeouts(stall=2))
    with pytest.raises(TransferError):
        take_compile_cache(client, mine, IDENTITY)
    assert tree(mine.root.parent.parent) == before
    assert [p.name for p in mine.root.iterdir()] == ["unrelated"]
    assert [p.name for p in mine.root.parent.parent.iterdir()] == ["torch_compile_cache"]


def test_a_seed_that_has_not_compiled_offers_no_cache(tmp_path: Path) -> None:
    empty = key(tmp_path / "nothing")
    weights = LoadedTensors({"w": torch.ones(4)}, IDENTITY)
    with (
        Server(weights, compile_cache=cache_holdings(empty, IDENTITY)) as server,
        pytest.raises(SourceUnavailable, match="no compile cache"),
    ):
        take_compile_cache(Client([server.address]), key(tmp_path / "c"), IDENTITY)
    with (
        Server(weights) as server,  # SHARE_COMPILE_CACHE off
        pytest.raises(SourceUnavailable, match="offers no compile-cache"),
    ):
        take_compile_cache(Client([server.address]), key(tmp_path / "c"), IDENTITY)


def test_names_outside_the_key_are_refused(tmp_path: Path) -> None:
    """A hostile seed offering a file outside the directories of its key."""
    hostile = key(tmp_path / "h")
    files = {f"{hostile.keys[0]}/../../evil": torch.zeros(3, dtype=torch.uint8)}
    attributes = {**IDENTITY.attributes, **hostile.attributes()}

    def offer() -> LoadedTensors:
        return LoadedTensors(files, Identity("tiny", attributes=attributes))

    weights = LoadedTensors({"w": torch.ones(4)}, IDENTITY)
    with (
        Server(weights, compile_cache=offer) as server,
        pytest.raises(NetloaderError, match="file named"),
    ):
        take_compile_cache(Client([server.address]), key(tmp_path / "c"), IDENTITY)
    assert not (tmp_path / "c").exists() and not list(tmp_path.rglob("evil"))


def test_the_cli_takes_a_cache_only_with_a_secret(
    seed: Server, seed_key: CompileKey, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "vllm-cache"
    argv = ["pull", str(seed.address), "--out", str(tmp_path / "m"), "--compile-cache", str(root)]
    refused = run_cli(*argv)
    assert refused.returncode == 2 and "code vLLM will run" in refused.stderr
    monkeypatch.setenv("NETLOADER_SECRET", SECRET.decode())
    taken = run_cli(*argv)
    assert taken.returncode == 0, taken.stderr
    assert "took the compile cache (4 files" in taken.stdout
    aot = root / "torch_compile_cache" / "torch_aot_compile"
    assert tree(aot) == tree(seed_key.root)
    assert (root / "modelinfos").is_dir()
