"""The segmentation network: MONAI's 2-D U-Net, small enough to train on two CPU cores."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """MONAI ``UNet(spatial_dims=2, in_channels=1, out_channels=classes, channels, strides=2...)``."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    classes: int = 2
    dropout: float = 0.0


def build_network(cfg: NetworkConfig, seed: int = 0) -> nn.Module:
    """A freshly initialised U-Net (weights drawn after ``torch.manual_seed(seed)``).

    Input float32 ``(B, 1, S, S)`` with S divisible by ``2 ** (len(channels) - 1)``;
    output logits ``(B, classes, S, S)``, channel 0 background.
    """
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=1, out_channels=cfg.classes, channels=tuple(cfg.channels),
                strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units, dropout=cfg.dropout)
