"""Trained U-Net segmenters (``training/`` checkpoints) as prompt-free ONNX models.

Served tensors: ``image`` float32 ``(B, 1, S, S)`` (:func:`export.segmenter_io.preprocess`)
-> ``logits`` float32 ``(B, C, S, S)`` (channel 0 background; :func:`export.segmenter_io.postprocess`).
B is dynamic (``max_batch_size`` 4 in ``config.pbtxt``). Gateway metadata: ``medseg.model``
(e.g. ``unet_brain``), ``medseg.role`` = ``segmenter``, ``medseg.prompt_kinds`` = ``""``
(prompt-free: the whole image is segmented), ``medseg.input_size``, ``medseg.structure``,
``medseg.description``.

Rebuilding the network needs the training extra (MONAI, ``requirements/training.txt``).
``python -m export unet`` exports every checkpoint ``CACHE_DIR/unet/NAME.pt`` as model
``NAME``; ``python -m training export`` exports one checkpoint directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from export.onnx_io import export_onnx
from export.triton_config import ONNX_FILENAME, RepositoryModel, Tensor, write_config

INPUT = "image"
OUTPUT = "logits"
ROLE = "segmenter"


class SegmenterForExport(nn.Module):
    """``forward(image) -> logits`` exactly as served."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def unet_entry(name: str, size: int, classes: int, version: str, structure: str, description: str) -> RepositoryModel:
    """The repository entry (config.pbtxt content) of one trained segmenter."""
    return RepositoryModel(
        name=name,
        inputs=(Tensor(INPUT, (1, size, size)),),
        outputs=(Tensor(OUTPUT, (classes, size, size)),),
        max_batch_size=4,
        dynamic_batching=True,
        preferred_batch_sizes=(2, 4),
        parameters={
            "medseg.model": name,
            "medseg.role": ROLE,
            "medseg.version": version,
            "medseg.input_size": str(size),
            "medseg.prompt_kinds": "",
            "medseg.structure": structure,
            "medseg.description": description,
        },
    )


def export_checkpoint(checkpoint: Path, repository: Path, name: str, target: str = "cpu",
                      version: int = 1, description: str | None = None) -> list[Path]:
    """Write ``repository/NAME/VERSION/model.onnx`` (checked against PyTorch by
    :func:`export.onnx_io.export_onnx`) and ``repository/NAME/config.pbtxt``."""
    from training.train import load_model

    model, cfg = load_model(checkpoint)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:8]
    entry = unet_entry(
        name, cfg.size, cfg.network.classes, f"{version}-{digest}", cfg.structure,
        description or (f"MONAI 2-D U-Net {tuple(cfg.network.channels)}, input {cfg.size}x{cfg.size}, "
                        f"segments {cfg.structure} without prompts; trained with '{cfg.method}' supervision "
                        f"({cfg.iterations} iterations, seed {cfg.seed})"),
    )
    onnx_path = repository / name / str(version) / ONNX_FILENAME
    image = torch.rand(2, 1, cfg.size, cfg.size, generator=torch.Generator().manual_seed(0))
    export_onnx(SegmenterForExport(model), {INPUT: image}, [OUTPUT], {INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                onnx_path)
    return [onnx_path, write_config(repository, entry, target, version=version)]
