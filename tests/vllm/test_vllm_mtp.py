"""Speculative decoding with a multi-token-prediction (MTP) draft: vLLM's method "mtp" builds
the draft (MiMoMTPModel) from the target's own checkpoint (scripts/make_tiny_mtp.py: a
Qwen2 body saved as MiMoForCausalLM with one MTP layer) and loads it second, in the same
worker, as it loads a separate draft model. A seed that loaded both from disk serves the
target on LISTEN_PORT and the MTP draft on LISTEN_PORT + 10000; a client whose directory
holds no weight file loads both over the network, drafts with the MTP layer, and answers
as the seed does at temperature 0. Two vLLM starts, one after the other."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from netloader import Client
from netloader.config import DRAFT_PORT_OFFSET
from netloader.testing.processes import read_address_file
from netloader.testing.vllm import VllmInstance, make_weightless_dir
from support.vllm_checks import (
    DRAFT_SERVES,
    Starter,
    fallback_reasons,
    loaded_lines,
    port_pair,
    serve_line,
)

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1200)]

MTP = ("--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": 1}))
SPEC_METRICS = re.compile(
    r"SpecDecoding metrics: .*Accepted: (\d+) tokens, Drafted: (\d+) tokens, .*"
    r"Avg Draft acceptance rate: ([\d.]+)%"
)
# vLLM replaces an MTP draft's embedding and lm_head by the target's once it has loaded:
# the draft serves the target's (equal) tensors, so that its own copies are freed.
SHARED = re.compile(
    r"netloader: rank 0 draft serves 2 tensors \((\d+) bytes\) from its target's equal ones, "
    r"not its own copies: (.*)$"
)
SHARED_NAMES = {"model.embed_tokens.weight", "lm_head.weight"}
STATS_EVERY_SECOND = {"VLLM_LOG_STATS_INTERVAL": "1"}  # the SpecDecoding line, soon


def shares_with_target(instance: VllmInstance) -> bool:
    found = [m for ln in instance.netloader_lines() if (m := SHARED.search(ln))]
    return len(found) == 1 and set(found[0].group(2).split(", ")) == SHARED_NAMES


def drafted(instance: VllmInstance, timeout: float = 15.0) -> list[re.Match[str]]:
    """The SpecDecoding metrics lines of `instance`'s log (vLLM writes them at its next
    stats interval after requests ran): proof that the draft proposed tokens."""
    deadline = time.monotonic() + timeout
    while True:
        found = [m for ln in instance.log_text().splitlines() if (m := SPEC_METRICS.search(ln))]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_target_and_mtp_draft_both_load_from_a_seed(
    start: Starter, mtp_model: Path, tmp_path: Path
) -> None:
    port = port_pair()
    seed_config = {
        "MODEL": "tiny-mtp",
        "SOURCE": [{"device_id": 0, "sources": []}],
        "LISTEN_PORT": port,
        "OUTPUT_PREFIX": start.prefix("mtp_seed"),
    }
    with start(
        "mtp_seed", mtp_model, seed_config, dtype="float32", extra_args=MTP, env=STATS_EVERY_SECOND
    ) as seed:
        log = "\n".join(seed.netloader_lines())
        assert "Resolved architecture: MiMoMTPModel" in seed.log_text()
        assert sorted(fallback_reasons(seed)) == sorted(
            ["SOURCE has no sources for rank 0", "SOURCE has no sources for rank 0 draft"]
        ), log
        target_address = read_address_file(Path(f"{start.prefix('mtp_seed')}0.txt"))
        draft_address = read_address_file(Path(f"{start.prefix('mtp_seed')}0.draft.txt"))
        assert target_address.endswith(f":{port}")
        assert draft_address.endswith(f":{port + DRAFT_PORT_OFFSET}")
        assert serve_line(seed).group(4) == target_address
        draft_served = [m for ln in seed.netloader_lines() if (m := DRAFT_SERVES.search(ln))]
        assert [m.group(3) for m in draft_served] == [draft_address], log
        # The draft serves its own identity: the MTP layer with the embedding and lm_head
        # it loaded from the checkpoint (served from the target's equal tensors).
        manifest = Client([draft_address]).manifest()
        assert manifest.identity.model == "tiny-mtp/draft"
        names = {t.name for t in manifest.tensors}
        assert any(".mtp_layers." in n for n in names), sorted(names)
        assert names >= SHARED_NAMES, sorted(names)
        assert shares_with_target(seed), log
        reference = seed.completions()
        assert len(set(reference.values())) > 1, f"the model ignores the prompt: {reference}"
        assert drafted(seed), seed.log_tail()

        client_dir = make_weightless_dir(mtp_model, tmp_path / "tiny-mtp")
        client_config = {
            "MODEL": "tiny-mtp",
            "SOURCE": [{"device_id": 0, "sources": [target_address]}],
        }
        with start(
            "mtp_client", client_dir, client_config, dtype="float32", extra_args=MTP,
            env=STATS_EVERY_SECOND,
        ) as client:  # fmt: skip
            found = loaded_lines(client)
            assert sorted(m.group(3) for m in found) == sorted([target_address, draft_address]), (
                client.netloader_lines()
            )
            assert fallback_reasons(client) == [], client.netloader_lines()
            assert shares_with_target(client), client.netloader_lines()
            assert client.completions() == reference
            metrics = drafted(client)
            assert metrics and sum(int(m.group(2)) for m in metrics) > 0, client.log_tail()
