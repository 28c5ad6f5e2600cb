"""Prompt-free U-Net segmenters: the network, its checkpoint format, and its ONNX export.

This module owns what a served segmenter *is*, so that serving and export never depend on the
training package: :class:`NetworkConfig` + :func:`build_network` (MONAI's 2-D U-Net; needs the
training extra, ``requirements/training.txt``), and the checkpoint layout ``training/`` writes
(``torch.save`` of a dict with ``"model"``: the state dict, and ``"config"``: the training
config as a dict, of which this module reads ``network``, ``seed``, ``size``, ``structure``,
``method`` and ``iterations``). ``training/`` imports these; this module imports nothing of it.

Served tensors: ``image`` float32 ``(B, 1, S, S)`` (:func:`service.core.segmenter_io.preprocess`;
a 2.5-D network ``(B, 2c + 1, S, S)``, the slice and ``c`` = ``context_slices`` neighbours on
each side, :func:`service.core.segmenter_io.slice_inputs`, gateway parameter
``medseg.context_slices``)
-> ``logits`` float32 ``(B, C, S, S)`` (channel 0 background; :func:`service.core.segmenter_io.postprocess`).
B is dynamic (``max_batch_size`` 4 in ``config.pbtxt``). Gateway metadata: model ``NAME``
(e.g. ``unet_brain``), role ``segmenter``, no prompt kinds (the whole image is segmented),
input size, structure, description.

``python -m export unet`` exports every checkpoint ``CACHE_DIR/unet/NAME.pt`` as model
``NAME``; ``python -m training export`` exports one checkpoint directly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from export.onnx_io import export_onnx
from export.options import ExportOptions
from export.triton_config import write_config
from service.backends.repository import GatewayParameters, RepositoryEntry, Role, TensorSpec
from service.core.segmenter_io import input_channels

INPUT = "image"
OUTPUT = "logits"


@dataclass(frozen=True)
class NetworkConfig:
    """MONAI ``UNet(spatial_dims=2, in_channels=2 * context_slices + 1, out_channels=classes,
    channels, strides=2...)``; ``context_slices`` > 0 makes it 2.5-D (the slice and that many
    neighbours on each side as channels, :func:`service.core.segmenter_io.context_indices`)."""

    channels: tuple[int, ...] = (16, 32, 64, 128)
    num_res_units: int = 1
    classes: int = 2
    dropout: float = 0.0
    context_slices: int = 0

    @property
    def in_channels(self) -> int:
        return input_channels(self.context_slices)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        return cls(**{**d, "channels": tuple(d.get("channels", cls.channels))})


def build_network(cfg: NetworkConfig, seed: int = 0) -> nn.Module:
    """A freshly initialised U-Net (weights drawn after ``torch.manual_seed(seed)``).

    Input float32 ``(B, in_channels, S, S)`` with S divisible by ``2 ** (len(channels) - 1)``;
    output logits ``(B, classes, S, S)``, channel 0 background.
    """
    from monai.networks.nets import UNet

    torch.manual_seed(seed)
    return UNet(spatial_dims=2, in_channels=cfg.in_channels, out_channels=cfg.classes, channels=tuple(cfg.channels),
                strides=(2,) * (len(cfg.channels) - 1), num_res_units=cfg.num_res_units, dropout=cfg.dropout)


def network_from_checkpoint(state: dict) -> nn.Module:
    """The trained network (eval mode) of a loaded checkpoint dict (layout in the module doc)."""
    config = state["config"]
    model = build_network(NetworkConfig.from_dict(config.get("network", {})), int(config.get("seed", 0)))
    model.load_state_dict(state["model"])
    return model.eval()


class SegmenterForExport(nn.Module):
    """``forward(image) -> logits`` exactly as served."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def unet_entry(name: str, size: int, classes: int, version: str, structure: str, description: str,
               context_slices: int = 0) -> RepositoryEntry:
    """The repository entry (config.pbtxt content) of one trained segmenter."""
    return RepositoryEntry(
        name=name,
        inputs=(TensorSpec(INPUT, (input_channels(context_slices), size, size)),),
        outputs=(TensorSpec(OUTPUT, (classes, size, size)),),
        max_batch_size=4,
        dynamic_batching=True,
        preferred_batch_sizes=(2, 4),
        gateway=GatewayParameters(model=name, role=Role.SEGMENTER, version=version, input_size=size,
                                  structure=structure, description=description, context_slices=context_slices),
    )


def export_checkpoint(checkpoint: Path, repository: Path, name: str, target: str = "cpu",
                      version: int = 1, description: str | None = None) -> list[Path]:
    """Write ``repository/NAME/VERSION/model.onnx`` (checked against PyTorch by
    :func:`export.onnx_io.export_onnx`) and ``repository/NAME/config.pbtxt``."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model, config = network_from_checkpoint(state), state["config"]
    network = NetworkConfig.from_dict(config.get("network", {}))
    size, structure = int(config["size"]), str(config["structure"])
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:8]
    entry = unet_entry(
        name, size, network.classes, f"{version}-{digest}", structure,
        description or (f"MONAI 2-D U-Net {tuple(network.channels)}, input {size}x{size}"
                        + (f" x {network.in_channels} neighbouring slices (2.5-D)" if network.context_slices else "")
                        + f", segments {structure} without prompts; trained with '{config.get('method')}' supervision "
                        f"({config.get('iterations')} iterations, seed {config.get('seed', 0)})"),
        network.context_slices,
    )
    onnx_path = Path(repository) / name / str(version) / entry.runtime.onnx_filename
    image = torch.rand(2, network.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    export_onnx(SegmenterForExport(model), {INPUT: image}, [OUTPUT], {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                onnx_path)
    return [onnx_path, write_config(repository, entry, target, version=version)]


def export_checkpoints(opts: ExportOptions) -> list[Path]:
    """Every trained segmenter checkpoint ``CACHE_DIR/unet/NAME.pt`` as model ``NAME``."""
    checkpoints = sorted((opts.cache_dir / "unet").glob("*.pt"))
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoints in {opts.cache_dir / 'unet'}; train one with `python -m training`")
    written = []
    for ckpt in checkpoints:
        written += export_checkpoint(ckpt, opts.repository, ckpt.stem, opts.target, opts.version)
    return written
