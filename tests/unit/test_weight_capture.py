"""What an engine instance would serve after post-processing, without serving it: a
model left as loaded costs nothing. tests/test_weight_capture.py serves the captures."""

from __future__ import annotations

import pytest

from netloader.api import tensors_of
from netloader.integrations.weight_capture import capture, check_intact, kept_bytes, share_equal
from support.engine import IDENT, config, make_model


def test_untouched_model_costs_nothing() -> None:
    model = make_model()
    captured = capture(tensors_of(model), IDENT, config())
    assert check_intact(captured) is None
    assert kept_bytes(captured, dict(model.named_parameters())) == 0


@pytest.mark.parametrize("int8_cache", ["no", "dram"])
def test_a_draft_serves_its_targets_equal_tensors_and_frees_its_own(int8_cache: str) -> None:
    """As vLLM's MTP drafts: the draft loads its own copy of the target's embedding, then
    vLLM drops it for the target's. Served from the target's tensor, nothing the draft serves
    holds the copy's memory (or, with INT8_CACHE=dram, a copy of it) any more."""
    target, draft = make_model(0), make_model(1)
    target_capture = capture(tensors_of(target), IDENT, config())
    draft[0].weight.data = target[0].weight.detach().clone()  # equal values, own memory
    draft_capture = capture(tensors_of(draft), IDENT, config(INT8_CACHE=int8_cache))
    manifest = draft_capture.manifest
    shared_capture, shared = share_equal(draft_capture, target_capture.tensors)
    # and the LayerNorm's, still at their initial ones and zeros; the Linears' others differ
    assert shared == ["0.weight", "1.weight", "1.bias"]
    assert shared_capture.tensors["0.weight"] is target_capture.tensors["0.weight"]
    assert "0.weight" not in shared_capture.cached
    assert shared_capture.manifest == manifest and check_intact(shared_capture) is None
    held = draft_capture.tensors["0.weight"].data_ptr()  # the draft's own, or its copy
    assert held == draft[0].weight.data_ptr() or int8_cache == "dram"
    assert held not in {t.data_ptr() for t in shared_capture.tensors.values()}
    assert share_equal(shared_capture, {"0.weight": target[0].weight[:1]}) == (shared_capture, [])
