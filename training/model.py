"""The segmentation network: MONAI's 2-D U-Net, small enough to train on two CPU cores.

Defined in :mod:`export.unet` (what is served is what is trained); re-exported here as part of
the training package's API.
"""

from export.unet import NetworkConfig, build_network

__all__ = ["NetworkConfig", "build_network"]
