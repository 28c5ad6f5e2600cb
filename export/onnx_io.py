"""Write an export-only wrapper to ONNX and check the file with ONNX Runtime right away
(opened as the gateway opens it: :func:`service.backends.runtimes.open_session`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from service.backends.runtimes import open_session

log = logging.getLogger(__name__)


def export_onnx(
    module: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    path: Path,
    opset: int = 17,
) -> None:
    """Export ``module(**inputs)`` to ``path`` (written atomically), then verify it.

    The check runs the file in ONNX Runtime on the same inputs and requires outputs
    close to PyTorch's (``atol`` 1e-3 on the logits scale; typical is ~1e-5).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".onnx.tmp")
    module.eval()
    with torch.no_grad():
        torch.onnx.export(
            module,
            tuple(inputs.values()),
            str(tmp),
            input_names=list(inputs),
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
        expected = module(**inputs)
    onnx.checker.check_model(str(tmp))
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = run_onnx(tmp, {k: v.numpy() for k, v in inputs.items()}, output_names)
    for name, want, have in zip(output_names, expected, got):
        diff = float(np.max(np.abs(want.numpy() - have)))
        log.info("%s: %s max |torch - onnxruntime| = %.3g", path.name, name, diff)
        if not np.isfinite(diff) or diff > 1e-3:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"{path.name}: output {name} differs from PyTorch by {diff:.3g}")
    tmp.replace(path)


def run_onnx(path: Path, feeds: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
    """``output_names`` of the ONNX file at ``path`` on ``feeds``, in the gateway's ONNX Runtime session."""
    return open_session(path, {}).run(output_names, feeds)
