"""What an engine instance would serve after post-processing, without serving it: a
model left as loaded costs nothing. tests/test_weight_capture.py serves the captures."""

from __future__ import annotations

from netloader.api import tensors_of
from netloader.integrations.weight_capture import capture, check_intact, kept_bytes
from support.engine import IDENT, config, make_model


def test_untouched_model_costs_nothing() -> None:
    model = make_model()
    captured = capture(tensors_of(model), IDENT, config())
    assert check_intact(captured) is None
    assert kept_bytes(captured, dict(model.named_parameters())) == 0
