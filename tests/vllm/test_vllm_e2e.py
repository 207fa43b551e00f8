"""vLLM (CPU, 0.32.0) with `--load-format netloader`, end to end: real servers, real
weights over loopback, and the seed document's test: the same prompts at temperature 0
give the same completions on an instance that loaded from disk and on one that loaded
from it over the network.

Most instances run with --dtype float32: on this CPU that is what makes vLLM's
post-processing pack every linear weight into a oneDNN handle and leave an empty
`weight` behind (the trap), so serving them needs the references netloader keeps.
Each start costs ~30 s, so instances are shared by the tests of a class.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import netloader
from netloader import Client
from netloader.config import DRAFT_PORT_OFFSET
from netloader.tensors import dtype_from_name
from netloader.testing.models import TensorSpec, empty_like
from netloader.testing.processes import read_address_file
from netloader.testing.vllm import PROMPTS, VllmInstance, free_port, make_weightless_dir
from support.vllm_checks import (
    JOINED,
    SECRET,
    Starter,
    assert_loaded_over_network,
    fallback_reasons,
    loaded_lines,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]


# ---- float32 seed, its clients, and the fallbacks -----------------------------------------
@pytest.fixture(scope="class")
def client32(
    start: Starter, seed32: VllmInstance, client_model_dir: Path
) -> Iterator[VllmInstance]:
    """No weight files: loads from seed32 over the network, and serves in turn."""
    config = {
        "MODEL": "tiny",
        "SOURCE": [start.source("seed32")],
        "OUTPUT_PREFIX": start.prefix("client32"),
    }
    with start("client32", client_model_dir, config, dtype="float32") as client:
        yield client


class TestFloat32SeedAndClients:
    def test_seed_serves_what_it_loaded_from_disk(self, seed32: VllmInstance) -> None:
        assert fallback_reasons(seed32) == ["SOURCE has no sources for rank 0"]
        served = serve_line(seed32)
        total, kept = int(served.group(3)), int(served.group(5))
        assert served.group(6) == "no"
        # The trap: post-processing replaced the linear weights with empty tensors; the
        # originals are kept by reference (not copied), so some but not all bytes are extra.
        assert 0 < kept < total, served.group(0)

    def test_the_python_api_loads_from_a_vllm_seed_by_its_name(
        self, start: Starter, seed32: VllmInstance, tiny_model: Path
    ) -> None:
        """`netloader.load(tensors, [addr], "tiny")` from a vLLM seed: the tensors are the
        seed's parameters as vLLM names them (fused qkv_proj, gate_up_proj), the
        checkpoint's bytes in float32."""
        address = start.source("seed32")["sources"][0]
        manifest = Client([address]).manifest()
        specs = [TensorSpec(t.name, dtype_from_name(t.dtype), t.shape) for t in manifest.tensors]
        dest = empty_like(specs, fill=0)
        report = netloader.load(dest, [address], "tiny")
        assert report.tensors == len(dest) > 0
        checkpoint = load_file(tiny_model / "model.safetensors")
        fused = {
            "qkv_proj": ("q_proj", "k_proj", "v_proj"),
            "gate_up_proj": ("gate_proj", "up_proj"),
        }
        for name, tensor in dest.items():
            parts = next(
                ([name.replace(f, p) for p in ps] for f, ps in fused.items() if f in name),
                [name],
            )
            assert all(p in checkpoint for p in parts), f"{name}: no {parts} in the checkpoint"
            original = torch.cat([checkpoint[p] for p in parts]).float()
            assert torch.equal(tensor, original), name
        with pytest.raises(
            netloader.ManifestMismatch, match=re.escape("server has 'tiny' (pass 'tiny'")
        ):
            netloader.load(empty_like(dest, fill=0), [address], "llama")

    def test_client_loads_from_seed_and_answers_identically(
        self,
        start: Starter,
        seed32: VllmInstance,
        client32: VllmInstance,
        reference32: dict[str, str],
    ) -> None:
        # On one host a client reads the seed's memory itself (the same-host transport).
        source = start.source("seed32")["sources"][0]
        assert_loaded_over_network(client32, source, transport="same-host")
        loaded = loaded_lines(client32)[0]
        served = serve_line(seed32)
        assert (loaded.group(1), loaded.group(2)) == (served.group(2), served.group(3))
        assert client32.completions() == reference32
        # It serves in turn the very same tensors.
        assert serve_line(client32).group(2, 3) == served.group(2, 3)

    def test_chain_second_client_loads_from_first_client(
        self,
        start: Starter,
        client32: VllmInstance,
        client_model_dir: Path,
        reference32: dict[str, str],
    ) -> None:
        source = start.source("client32")
        config = {"MODEL": "tiny", "SOURCE": [source]}
        with start("chain32", client_model_dir, config, dtype="float32") as chain:
            assert_loaded_over_network(chain, source["sources"][0])
            assert chain.completions() == reference32

    def test_wave_started_together_forms_a_chain(
        self,
        start: Starter,
        seed32: VllmInstance,
        client_model_dir: Path,
        reference32: dict[str, str],
    ) -> None:
        """Two weightless instances started at once with the same WAVE_DIR: each listens
        before it loads and joins the wave; the first member pulls from the seed, the
        second from the first (relayed), and each then serves what it loaded."""
        wave = start.logs / "wave32"
        wave.mkdir()
        # What a seed started with OUTPUT_PREFIX=WAVE_DIR/seed- writes there.
        seed_address = start.source("seed32")["sources"][0]
        (wave / "seed-0.txt").write_text(f"{seed_address}\n")
        config = {"MODEL": "tiny", "WAVE_DIR": str(wave)}
        members = [start(f"wave32_{i}", client_model_dir, config, dtype="float32") for i in (0, 1)]
        try:
            for member in members:
                member.start()
            for member in members:
                member.wait_ready()
            by_position = {}
            for member in members:
                joined = [m for line in member.netloader_lines() if (m := JOINED.search(line))]
                assert len(joined) == 1, member.netloader_lines()
                by_position[int(joined[0].group(1))] = (member, joined[0].group(2))
            assert sorted(by_position) == [0, 1]
            (first, first_address), (second, second_address) = by_position[0], by_position[1]
            for position, address in ((0, first_address), (1, second_address)):
                assert (wave / "rank0" / f"0000{position}.txt").read_text().strip() == address
            assert_loaded_over_network(first, seed_address)
            assert_loaded_over_network(second, first_address)  # not from the seed
            served = serve_line(seed32)
            for member, address in by_position.values():
                assert serve_line(member).group(2, 3, 4) == (*served.group(2, 3), address)
                assert member.completions() == reference32
        finally:
            for member in members:
                member.stop()

    @pytest.mark.parametrize(
        ("case", "reason"),
        [
            ("wrong_model", "model: expected 'other-model', server has 'tiny'"),
            ("unreachable", "cannot connect to 127.0.0.1:1"),
            ("no_sources", "SOURCE has no sources for rank 0"),
            ("wave_without_seed", "has no seed or earlier member for rank 0"),
            ("config_differs", "attribute config: expected"),
        ],
    )
    def test_fallback_to_disk_names_the_reason(
        self, start: Starter, seed32: VllmInstance, tiny_model: Path, reference32: dict[str, str],
        tmp_path: Path, case: str, reason: str,
    ) -> None:  # fmt: skip
        configs: dict[str, dict[str, Any]] = {
            "wrong_model": {"MODEL": "other-model", "SOURCE": [start.source("seed32")]},
            "unreachable": {
                "MODEL": "tiny",
                "SOURCE": [{"device_id": 0, "sources": ["127.0.0.1:1"]}],
            },
            "no_sources": {"MODEL": "tiny", "SOURCE": [{"device_id": 0, "sources": []}]},
            "wave_without_seed": {"MODEL": "tiny", "WAVE_DIR": str(start.logs / "empty_wave")},
            "config_differs": {"MODEL": "tiny", "SOURCE": [start.source("seed32")]},
        }
        model = tiny_model
        if case == "config_differs":  # a field inference never reads: same outputs
            model = Path(shutil.copytree(tiny_model, tmp_path / "tiny"))
            config = json.loads((model / "config.json").read_text())
            config["initializer_range"] = 0.03
            (model / "config.json").write_text(json.dumps(config))
        with start(f"fallback_{case}", model, configs[case], dtype="float32") as instance:
            reasons = fallback_reasons(instance)
            assert len(reasons) == 1 and reason in reasons[0], instance.netloader_lines()
            assert loaded_lines(instance) == []
            assert instance.completions() == reference32
            # Loaded from disk, it serves the next instance all the same (a wave member
            # through the relay that refused while it had nothing).
            manifest = Client([serve_line(instance).group(4)]).manifest()
            assert manifest.identity.model == configs[case]["MODEL"]
            assert manifest.total_bytes == int(serve_line(seed32).group(3))

    def test_dtype_mismatch_falls_back_and_bfloat16_round_trip(
        self, start: Starter, seed32: VllmInstance, tiny_model: Path, client_model_dir: Path
    ) -> None:
        """A bfloat16 instance refuses the float32 seed (dtype named), loads from disk and
        serves; a bfloat16 client then loads from it (vLLM's default dtype here)."""
        config = {
            "MODEL": "tiny",
            "SOURCE": [start.source("seed32")],
            "OUTPUT_PREFIX": start.prefix("seed16"),
        }
        with start("seed16", tiny_model, config) as seed16:
            reasons = fallback_reasons(seed16)
            assert (
                len(reasons) == 1
                and "dtype: expected 'bfloat16', server has 'float32'" in reasons[0]
            )
            reference16 = seed16.completions()
            source = start.source("seed16")
            with start(
                "client16", client_model_dir, {"MODEL": "tiny", "SOURCE": [source]}
            ) as client16:
                assert_loaded_over_network(client16, source["sources"][0])
                assert client16.completions() == reference16


# ---- INT8_CACHE=dram and a shared secret ---------------------------------------------------
@pytest.fixture(scope="class")
def seed_dram(start: Starter, tiny_model: Path) -> Iterator[VllmInstance]:
    """float32, INT8_CACHE=dram (copies of every parameter), NETLOADER_SECRET set."""
    config = {"MODEL": "tiny", "INT8_CACHE": "dram", "OUTPUT_PREFIX": start.prefix("seed_dram")}
    with start(
        "seed_dram", tiny_model, config, dtype="float32", env={"NETLOADER_SECRET": SECRET}
    ) as seed:
        yield seed


class TestInt8CacheAndSecret:
    def test_dram_cache_keeps_copies_and_client_with_secret_loads(
        self, start: Starter, seed_dram: VllmInstance, client_model_dir: Path
    ) -> None:
        served = serve_line(seed_dram)
        assert served.group(6) == "dram"
        assert int(served.group(5)) == int(served.group(3)), served.group(0)  # all copies
        reference = seed_dram.completions()
        source = start.source("seed_dram")
        config = {"MODEL": "tiny", "SOURCE": [source]}
        env = {"NETLOADER_SECRET": SECRET}
        with start("client_secret", client_model_dir, config, dtype="float32", env=env) as client:
            assert_loaded_over_network(client, source["sources"][0])
            assert client.completions() == reference

    def test_client_without_secret_falls_back_naming_authentication(
        self, start: Starter, seed_dram: VllmInstance, tiny_model: Path
    ) -> None:
        config = {"MODEL": "tiny", "SOURCE": [start.source("seed_dram")]}
        with start("client_nosecret", tiny_model, config, dtype="float32") as client:
            reasons = fallback_reasons(client)
            assert len(reasons) == 1 and "requires a secret" in reasons[0], reasons
            assert client.completions() == seed_dram.completions()


# ---- tensor parallel 2 ---------------------------------------------------------------------
class TestTensorParallel:
    def test_tp2_client_loads_each_rank_from_the_seeds_rank(
        self, start: Starter, tiny_model: Path, client_model_dir: Path
    ) -> None:
        config = {"MODEL": "tiny", "OUTPUT_PREFIX": start.prefix("seed_tp2")}
        kw: dict[str, Any] = {"dtype": "float32", "tensor_parallel": 2, "ready_timeout": 300}
        with start("seed_tp2", tiny_model, config, **kw) as seed:
            reference = seed.completions(PROMPTS[:3])
            for rank in (0, 1):
                served = serve_line(seed, rank)
                assert 0 < int(served.group(5)) < int(served.group(3))
            sources = [start.source("seed_tp2", rank) for rank in (0, 1)]
            with start(
                "client_tp2", client_model_dir, {"MODEL": "tiny", "SOURCE": sources}, **kw
            ) as client:
                found = loaded_lines(client)
                assert sorted(m.group(3) for m in found) == sorted(s["sources"][0] for s in sources)
                assert fallback_reasons(client) == []
                assert client.completions(PROMPTS[:3]) == reference


# ---- speculative decoding: a draft model beside the target -------------------------------
DRAFT_SERVES = re.compile(r"netloader: rank 0 draft serves (\d+) tensors \((\d+) bytes\) on (\S+);")


def _port_pair() -> int:
    """A free port whose draft twin (+10000) is free too."""
    for _ in range(50):
        port = free_port()
        if port + DRAFT_PORT_OFFSET <= 65535:
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + DRAFT_PORT_OFFSET))
                    return port
                except OSError:
                    continue
    raise RuntimeError("no free port pair")


def _speculative(draft_dir: Path) -> tuple[str, ...]:
    config = {"method": "draft_model", "model": str(draft_dir), "num_speculative_tokens": 2}
    return ("--speculative-config", json.dumps(config))


class TestSpeculativeDecoding:
    def test_target_and_draft_both_load_from_a_speculative_seed(
        self,
        start: Starter,
        tiny_model: Path,
        draft_model: Path,
        client_model_dir: Path,
        tmp_path: Path,
    ) -> None:
        """A seed running speculative decoding serves its target on LISTEN_PORT and its
        draft on LISTEN_PORT + 10000 (files seed_0.txt and seed_0.draft.txt); a client whose
        target and draft folders hold no weights loads both and answers identically."""
        port = _port_pair()
        seed_config = {"MODEL": "tiny", "LISTEN_PORT": port, "OUTPUT_PREFIX": start.prefix("spec")}
        with start(
            "spec_seed", tiny_model, seed_config, extra_args=_speculative(draft_model)
        ) as seed:
            target_address = read_address_file(Path(f"{start.prefix('spec')}0.txt"))
            draft_address = read_address_file(Path(f"{start.prefix('spec')}0.draft.txt"))
            assert target_address.endswith(f":{port}")
            assert draft_address.endswith(f":{port + DRAFT_PORT_OFFSET}")
            draft_served = [m for ln in seed.netloader_lines() if (m := DRAFT_SERVES.search(ln))]
            assert len(draft_served) == 1 and serve_line(seed).group(4) == target_address
            reference = seed.completions()
            Client([draft_address]).manifest()  # the draft's own server answers
            draft_dir = make_weightless_dir(draft_model, tmp_path / "draft")
            client_config = {
                "MODEL": "tiny",
                "SOURCE": [{"device_id": 0, "sources": [target_address]}],
            }
            with start(
                "spec_client", client_model_dir, client_config, extra_args=_speculative(draft_dir)
            ) as client:
                found = loaded_lines(client)
                assert sorted(m.group(3) for m in found) == sorted([target_address, draft_address])
                assert fallback_reasons(client) == [], client.netloader_lines()
                assert client.completions() == reference
                # Its listeners are on free ports (no LISTEN_PORT): a client of *it* finds
                # no draft at the +10000 offset, so its draft alone falls back to disk.
                client_target = serve_line(client).group(4)
                second_config = {
                    "MODEL": "tiny",
                    "SOURCE": [{"device_id": 0, "sources": [client_target]}],
                }
                with start(
                    "spec_client2",
                    client_model_dir,
                    second_config,
                    extra_args=_speculative(draft_model),
                ) as second:
                    assert [m.group(3) for m in loaded_lines(second)] == [client_target]
                    reasons = fallback_reasons(second)
                    assert len(reasons) == 1 and "cannot connect" in reasons[0], reasons
                    assert any(
                        "rank 0 draft loads from disk" in line for line in second.netloader_lines()
                    )
                    assert second.completions() == reference


# ---- int8-quantized (W8A8) models: what INT8_CACHE exists for ---------------------------
@pytest.mark.parametrize(
    ("mode", "names"),
    [("no", None), ("dram", None), ("hbm", None), ("dram", ["*.weight"])],
    ids=["no", "dram", "hbm", "dram-weights-only"],
)
def test_w8a8_seed_and_client_answer_identically(
    start: Starter, w8a8_model: Path, tmp_path: Path, mode: str, names: list[str] | None
) -> None:
    """A W8A8 int8 seed (compressed-tensors, vLLM's CPU int8 kernel) loads from disk and
    serves; a client without weight files loads from it and answers identically. The
    bytes kept beyond the running model follow INT8_CACHE: `dram`/`hbm` keep a copy of
    every parameter (hbm is the parameters' own device, the CPU here), a name filter
    keeps fewer."""
    label = f"w8a8_{mode}{'_named' if names else ''}"
    config: dict[str, Any] = {"MODEL": "tiny-w8a8", "OUTPUT_PREFIX": start.prefix(label)}
    config["INT8_CACHE"] = mode
    if names:
        config["INT8_CACHE_NAME"] = names
    with start(f"{label}_seed", w8a8_model, config) as seed:
        served = serve_line(seed)
        total, kept = int(served.group(3)), int(served.group(5))
        assert served.group(6) == mode
        if mode in ("dram", "hbm") and not names:
            assert kept == total, served.group(0)
        elif names:
            assert 0 < kept < total, served.group(0)
        reference = seed.completions()
        client_dir = make_weightless_dir(w8a8_model, tmp_path / "w8a8")
        client_config = {"MODEL": "tiny-w8a8", "SOURCE": [start.source(label)]}
        with start(f"{label}_client", client_dir, client_config) as client:
            assert_loaded_over_network(client, start.source(label)["sources"][0])
            assert loaded_lines(client)[0].group(2) == str(total)
            assert client.completions() == reference


def test_a_quantization_mismatch_falls_back_naming_it(
    start: Starter, w8a8_model: Path, tiny_model: Path
) -> None:
    config = {"MODEL": "tiny-w8a8", "OUTPUT_PREFIX": start.prefix("w8a8_mm")}
    with start("w8a8_mm_seed", w8a8_model, config) as seed:
        del seed
        client_config = {"MODEL": "tiny-w8a8", "SOURCE": [start.source("w8a8_mm")]}
        with start("w8a8_mm_client", tiny_model, client_config) as client:
            reasons = fallback_reasons(client)
            assert len(reasons) == 1 and "quantization" in reasons[0], reasons
            assert "compressed-tensors" in reasons[0], reasons
            assert len(client.completions()) == len(PROMPTS)
