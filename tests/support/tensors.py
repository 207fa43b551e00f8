"""Destinations for pulls in tests: filled with a sentinel byte, so a test can tell
which bytes a pull wrote."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from netloader.testing.models import Tensors, empty_like

SENTINEL = 0xA5


def empty_like_set(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Contiguous destinations of the same names, dtypes and shapes, every byte SENTINEL."""
    return empty_like(tensors, fill=SENTINEL)


def untouched(dest: Mapping[str, torch.Tensor]) -> bool:
    """No byte of `dest` was written since empty_like_set made it."""
    return all(bool((t.reshape(-1).view(torch.uint8) == SENTINEL).all()) for t in dest.values())
