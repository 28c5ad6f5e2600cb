"""FP16 TensorRT engines for GPU nodes, written as Triton ``tensorrt_plan`` repository entries.

TensorRT cannot be installed on the project's CPU machines (the PyPI ``tensorrt`` packages
download from NVIDIA's own index), so it is imported lazily: everything else in ``export/``
works without it, and its tests skip with a reason. On a GPU node (NGC TensorRT or Triton
container, or ``pip install tensorrt`` where NVIDIA's index is reachable)::

    python -m export medsam_lite_tensorrt --repository /models-gpu

builds ``medsam_lite_encoder/1/model.plan`` (optimisation profile over the batch axis,
1..8, optimum 4) and ``medsam_lite_decoder/1/model.plan`` (1..16 prompts of 1..8 points),
writes their ``config.pbtxt`` (platform ``tensorrt_plan``, GPU instances, dynamic batching
for the encoder) and checks the engines against ONNX Runtime on the dev cases: mean Dice
within ``MAX_DICE_DELTA``. Engines are specific to the GPU model and TensorRT version that
built them: build them on the node type that serves them.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from export.options import ExportOptions
from export.triton_config import write_config
from service.backends.repository import ONNX_FILENAME, PLAN_FILENAME, RepositoryEntry

log = logging.getLogger(__name__)
MAX_DICE_DELTA = 0.005
ENCODER_BATCH = (1, 4, 8)  # min, opt, max of the batch axis
DECODER_PROMPTS = (1, 4, 16)
DECODER_POINTS = (1, 3, 8)


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise RuntimeError("TensorRT is not installed: build engines on a GPU node (NGC TensorRT/Triton "
                           "container, or `pip install tensorrt` from NVIDIA's package index)") from exc
    return trt


def encoder_profile() -> dict[str, tuple[tuple[int, ...], ...]]:
    return {"image": tuple((b, 3, 256, 256) for b in ENCODER_BATCH)}


def decoder_profile() -> dict[str, tuple[tuple[int, ...], ...]]:
    p, n = DECODER_PROMPTS, DECODER_POINTS
    return {
        "image_embeddings": ((1, 256, 64, 64),) * 3,
        "point_coords": tuple((p[i], n[i], 2) for i in range(3)),
        "point_labels": tuple((p[i], n[i]) for i in range(3)),
        "mask_input": tuple((p[i], 1, 256, 256) for i in range(3)),
        "has_mask_input": tuple((p[i], 1) for i in range(3)),
    }


def build_engine(onnx_path: Path, plan_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]],
                 fp16: bool = True, workspace_bytes: int = 2 << 30) -> Path:
    """Parse ``onnx_path``, build a (FP16) engine with one optimisation profile, write it."""
    trt = require_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT < 10 needs it
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        problems = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {problems}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    opt = builder.create_optimization_profile()
    for name, (lo, mid, hi) in profile.items():
        opt.set_shape(name, lo, mid, hi)
    config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))
    return plan_path


class EngineRunner:
    """Runs a serialized engine with PyTorch CUDA tensors as buffers (TensorRT >= 10 API)."""

    def __init__(self, plan_path: Path) -> None:
        import torch

        trt = require_tensorrt()
        self.torch = torch
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        self.context = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in self.names}

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self.torch
        keep = {}
        for name, array in feeds.items():
            keep[name] = torch.from_numpy(np.ascontiguousarray(array)).cuda()
            self.context.set_input_shape(name, tuple(array.shape))
            self.context.set_tensor_address(name, keep[name].data_ptr())
        outputs = {}
        for name in self.names:
            if not self.is_input[name]:
                shape = tuple(self.context.get_tensor_shape(name))
                outputs[name] = torch.empty(shape, dtype=torch.float32, device="cuda")
                self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return {k: v.float().cpu().numpy() for k, v in outputs.items()}


def tensorrt_entries(encoder: RepositoryEntry, decoder: RepositoryEntry) -> tuple[RepositoryEntry, RepositoryEntry]:
    """Repository entries of the engines: same names and tensors, bigger encoder batches."""
    return (replace(encoder, max_batch_size=ENCODER_BATCH[-1], preferred_batch_sizes=(ENCODER_BATCH[1],)),
            replace(decoder))


def export_medsam_lite_tensorrt(opts: ExportOptions, data_dir: Path | None = None) -> list[Path]:
    """Build FP16 engines from the ONNX export and write tensorrt_plan entries (GPU node only)."""
    from export.dev_cases import SHARED_DATA
    from export.medsam_lite import export_medsam_lite, medsam_lite_entries

    require_tensorrt()
    onnx_opts = ExportOptions(repository=opts.cache_dir / "onnx", target="cpu", cache_dir=opts.cache_dir)
    export_medsam_lite(onnx_opts)
    encoder, decoder = tensorrt_entries(*medsam_lite_entries())
    written = []
    for entry, profile in ((encoder, encoder_profile()), (decoder, decoder_profile())):
        onnx_file = onnx_opts.repository / entry.name / "1" / ONNX_FILENAME
        plan = opts.repository / entry.name / str(opts.version) / PLAN_FILENAME
        written.append(build_engine(onnx_file, plan, profile))
        written.append(write_config(opts.repository, entry, "tensorrt", version=opts.version))
    check_tensorrt_dice(onnx_opts.repository, opts.repository, data_dir or SHARED_DATA / "dev")
    return written


def check_tensorrt_dice(onnx_repo: Path, plan_repo: Path, data_dir: Path) -> float:
    """Mean Dice of the engines vs ONNX Runtime on the dev cases; raises beyond MAX_DICE_DELTA."""
    from export.dice_guard import check_drop, dev_dice
    from service.inference.predictor import SamPredictor, sessions_run

    onnx = SamPredictor.from_repository(onnx_repo, "medsam_lite")
    model = onnx.model
    plans = sessions_run({e.name: EngineRunner(plan_repo / e.name / "1" / PLAN_FILENAME)
                          for e in (model.encoder, model.decoder)})
    base = dev_dice(onnx, data_dir)
    engines = dev_dice(SamPredictor(model, plans), data_dir)
    return abs(check_drop(base, engines, "TensorRT FP16 vs ONNX Runtime", MAX_DICE_DELTA, two_sided=True))
