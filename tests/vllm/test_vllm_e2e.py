"""vLLM (CPU, 0.32.0) with `--load-format netloader`, end to end: real servers, real
weights over loopback, and the seed document's test: the same prompts at temperature 0
give the same completions on an instance that loaded from disk and on one that loaded
from it over the network.

Most instances run with --dtype float32: on this CPU that is what makes vLLM's
post-processing pack every linear weight into a oneDNN handle and leave an empty
`weight` behind (the trap), so serving them needs the references netloader keeps.
Each start costs ~30 s, so instances are shared by the tests of a class, and an instance
that must fall back to disk for one reason is given a second reason where it can be (both
are checked). tp=2 and int8 models are in test_vllm_tp2.py and test_vllm_int8.py.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import netloader
from netloader import Client
from netloader.config import DRAFT_PORT_OFFSET
from netloader.testing.models import empty_like
from netloader.testing.processes import read_address_file
from netloader.testing.vllm import VllmInstance, make_weightless_dir, running
from support.vllm_checks import (
    DRAFT_SERVES,
    SECRET,
    Starter,
    assert_loaded_over_network,
    fallback_reasons,
    loaded_lines,
    port_pair,
    pull_parameters,
    serve_line,
    wave_positions,
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


FALLBACK_MODELS = {"identity_differs": "other-model", "wave_without_seed": "tiny"}


@pytest.fixture(scope="class")
def fallbacks(
    start: Starter, seed32: VllmInstance, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, VllmInstance]]:
    """Instances that must load from disk, started together (see FALLBACK_MODELS)."""
    other = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("other") / "tiny"))
    config = json.loads((other / "config.json").read_text())
    config["initializer_range"] = 0.03
    (other / "config.json").write_text(json.dumps(config))
    instances = {
        "identity_differs": start(
            "fallback_identity_differs",
            other,
            {"MODEL": FALLBACK_MODELS["identity_differs"], "SOURCE": [start.source("seed32")]},
            dtype="float32",
        ),
        "wave_without_seed": start(
            "fallback_wave_without_seed",
            tiny_model,
            {"MODEL": "tiny", "WAVE_DIR": str(start.logs / "empty_wave")},
            dtype="float32",
        ),
    }
    with running(*instances.values()):
        yield instances


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
        seed's parameters as vLLM names and shapes them (fused qkv_proj and gate_up_proj,
        padded vocabulary), holding the checkpoint's values in float32."""
        address = start.source("seed32")["sources"][0]
        _, dest = pull_parameters(address, "tiny")
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
            # vLLM pads vocabulary rows (embed_tokens, lm_head) to a multiple of 64 with zeros.
            rows = original.shape[0]
            assert tensor.shape[1:] == original.shape[1:] and tensor.shape[0] >= rows, name
            assert torch.equal(tensor[:rows], original) and not tensor[rows:].any(), name
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
        with running(*members):
            by_position = wave_positions(members)
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

    @pytest.mark.parametrize(
        ("case", "reasons"),
        [
            # Another name and another config.json (a field inference never reads, so the
            # outputs stay the same): both differences are named, in one line.
            (
                "identity_differs",
                ["model: expected 'other-model', server has 'tiny'", "attribute config: expected"],
            ),
            ("wave_without_seed", ["has no seed or earlier member for rank 0"]),
        ],
    )
    def test_fallback_to_disk_names_the_reason(
        self, seed32: VllmInstance, fallbacks: dict[str, VllmInstance],
        reference32: dict[str, str], case: str, reasons: list[str],
    ) -> None:  # fmt: skip
        instance = fallbacks[case]
        said = fallback_reasons(instance)
        assert len(said) == 1, instance.netloader_lines()
        assert all(reason in said[0] for reason in reasons), said
        assert loaded_lines(instance) == []
        assert instance.completions() == reference32
        # Loaded from disk, it serves the next instance all the same (a wave member
        # through the relay that refused while it had nothing).
        manifest = Client([serve_line(instance).group(4)]).manifest()
        assert manifest.identity.model == FALLBACK_MODELS[case]
        assert manifest.total_bytes == int(serve_line(seed32).group(3))

    def test_dtype_mismatch_falls_back_and_bfloat16_round_trip(
        self, start: Starter, seed32: VllmInstance, tiny_model: Path, client_model_dir: Path
    ) -> None:
        """A bfloat16 instance finds one source unreachable and refuses the float32 seed
        (dtype named), says both in one line, loads from disk and serves; a bfloat16
        client then loads from it (vLLM's default dtype here)."""
        sources = ["127.0.0.1:1", start.source("seed32")["sources"][0]]
        config = {
            "MODEL": "tiny",
            "SOURCE": [{"device_id": 0, "sources": sources}],
            "OUTPUT_PREFIX": start.prefix("seed16"),
        }
        with start("seed16", tiny_model, config) as seed16:
            reasons = fallback_reasons(seed16)
            assert len(reasons) == 1, reasons
            assert "cannot connect to 127.0.0.1:1" in reasons[0], reasons
            assert "dtype: expected 'bfloat16', server has 'float32'" in reasons[0], reasons
            assert loaded_lines(seed16) == []
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


@pytest.fixture(scope="class")
def dram_clients(
    start: Starter, seed_dram: VllmInstance, tiny_model: Path, client_model_dir: Path
) -> Iterator[dict[str, VllmInstance]]:
    """Two clients of seed_dram started together: one with the secret and no weight
    files, one without the secret (its weights on disk)."""
    config = {"MODEL": "tiny", "SOURCE": [start.source("seed_dram")]}
    instances = {
        "secret": start(
            "client_secret", client_model_dir, config, dtype="float32",
            env={"NETLOADER_SECRET": SECRET},
        ),
        "no_secret": start("client_nosecret", tiny_model, config, dtype="float32"),
    }  # fmt: skip
    with running(*instances.values()):
        yield instances


class TestInt8CacheAndSecret:
    def test_dram_cache_keeps_copies_and_client_with_secret_loads(
        self, start: Starter, seed_dram: VllmInstance, dram_clients: dict[str, VllmInstance]
    ) -> None:
        assert fallback_reasons(seed_dram) == ["SOURCE has no sources for rank 0"]  # none set
        served = serve_line(seed_dram)
        assert served.group(6) == "dram"
        assert int(served.group(5)) == int(served.group(3)), served.group(0)  # all copies
        client = dram_clients["secret"]
        assert_loaded_over_network(client, start.source("seed_dram")["sources"][0])
        assert client.completions() == seed_dram.completions()

    def test_client_without_secret_falls_back_naming_authentication(
        self, seed_dram: VllmInstance, dram_clients: dict[str, VllmInstance]
    ) -> None:
        client = dram_clients["no_secret"]
        reasons = fallback_reasons(client)
        assert len(reasons) == 1 and "requires a secret" in reasons[0], reasons
        assert client.completions() == seed_dram.completions()


# ---- speculative decoding: a draft model beside the target -------------------------------
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
        port = port_pair()
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
