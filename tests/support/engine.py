"""A small torch model and post-processing steps that behave like an engine's (vLLM's)
after it loads weights: what netloader.integrations.weight_capture must cope with."""

from __future__ import annotations

import torch

from netloader import Identity, NetloaderConfig

IDENT = Identity("tiny", attributes={"weights": "before-post-processing"})


def make_model(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.Linear(128, 32)
    )


def replace_linear_weights(model: torch.nn.Sequential) -> None:
    """Like vLLM's CPU path: pack the weight elsewhere, leave an empty Parameter behind."""
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            layer.packed = layer.weight.detach().t().contiguous()
            layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)


def modify_in_place(model: torch.nn.Sequential) -> None:
    """Like a repacking quantization method: the same tensor, new contents."""
    first = model[0]
    assert isinstance(first, torch.nn.Linear)
    with torch.no_grad():
        first.bias.mul_(2)


def config(**fields: object) -> NetloaderConfig:
    return NetloaderConfig.load(dict(fields), environ={})
