"""The four names LiteMedSAM's vendored TinyViT imports from ``timm``, without timm.

``timm`` cannot be imported on these machines (every version imports torchvision, whose
PyPI build is CUDA-linked). TinyViT only needs ``DropPath``, ``to_2tuple``,
``trunc_normal_`` and ``register_model``; this module registers a tiny stand-in as
``timm.models.layers`` / ``timm.models.registry`` before the import. Weights are then
loaded with ``strict=True``, so a mismatch with the real architecture cannot go unnoticed.
"""

from __future__ import annotations

import collections.abc
import sys
import types
from itertools import repeat
from typing import Any, Callable

import torch
from torch import nn


class DropPath(nn.Module):
    """Stochastic depth; identity at inference (every exported model runs in eval mode)."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob or 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep) / keep


def to_2tuple(x: Any) -> tuple:
    if isinstance(x, collections.abc.Iterable) and not isinstance(x, str):
        return tuple(x)
    return tuple(repeat(x, 2))


def trunc_normal_(tensor: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def register_model(fn: Callable) -> Callable:
    return fn


def install() -> None:
    """Register the stand-in unless a real, importable timm is already loaded."""
    if "timm.models.layers" in sys.modules:
        return
    timm = types.ModuleType("timm")
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, trunc_normal_
    registry.register_model = register_model
    timm.models, models.layers, models.registry = models, layers, registry
    sys.modules.update({"timm": timm, "timm.models": models,
                        "timm.models.layers": layers, "timm.models.registry": registry})
