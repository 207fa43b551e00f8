"""What an engine instance serves after post-processing (INT8_CACHE semantics), on plain
torch modules with post-processing steps that behave like vLLM's (support.engine)."""

from __future__ import annotations

import pytest
import torch

from netloader import Server, SourceUnavailable
from netloader.api import load, tensors_of
from netloader.integrations.weight_capture import capture, check_intact, kept_bytes
from netloader.server import LoadedTensors
from support.engine import IDENT, config, make_model, modify_in_place, replace_linear_weights


def pull_into_fresh_model(server: Server) -> torch.nn.Module:
    fresh = make_model(seed=99)
    load(fresh, [str(server.address)], IDENT)
    return fresh


def test_replaced_parameters_are_served_by_reference_without_copies() -> None:
    model = make_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(tensors_of(model), IDENT, config())
    replace_linear_weights(model)
    assert check_intact(captured) is None
    live = dict(model.named_parameters())
    linear_bytes = (64 * 128 + 128 * 32) * 4
    assert kept_bytes(captured, live) == linear_bytes  # only the replaced originals
    assert not captured.cached
    with Server(LoadedTensors(captured.tensors, IDENT, manifest=captured.manifest)) as server:
        fresh = pull_into_fresh_model(server)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, original[name]), name


def test_in_place_change_is_refused_naming_the_setting() -> None:
    model = make_model()
    captured = capture(tensors_of(model), IDENT, config())
    modify_in_place(model)
    reason = check_intact(captured)
    assert reason is not None and "INT8_CACHE=dram" in reason and "0.bias" in reason
    with Server(
        LoadedTensors(captured.tensors, IDENT, manifest=captured.manifest, unavailable=reason)
    ) as server:
        fresh = make_model(seed=99)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        with pytest.raises(SourceUnavailable, match="INT8_CACHE=dram"):
            load(fresh, [str(server.address)], IDENT)
        assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


@pytest.mark.parametrize("mode", ["dram", "hbm"])
def test_int8_cache_keeps_copies_of_selected_parameters(mode: str) -> None:
    model = make_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    captured = capture(tensors_of(model), IDENT, config(INT8_CACHE=mode, INT8_CACHE_NAME=["0."]))
    assert captured.cached == {"0.weight", "0.bias"}
    modify_in_place(model)
    replace_linear_weights(model)
    assert check_intact(captured) is None
    assert kept_bytes(captured, dict(model.named_parameters())) == (64 * 128 + 128 + 128 * 32) * 4
    with Server(LoadedTensors(captured.tensors, IDENT, manifest=captured.manifest)) as server:
        fresh = pull_into_fresh_model(server)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, original[name]), name
