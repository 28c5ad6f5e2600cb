"""Writer of Triton model-repository entries (``config.pbtxt``) for two targets.

* ``cpu``: Triton's python backend running ONNX Runtime on the ONNX file (what the
  ``nvidia-pytriton`` tritonserver on a CPU machine can load); the embedded backend reads
  the same file.
* ``gpu``: Triton's native ``onnxruntime`` backend on GPU instances with TensorRT FP16
  acceleration (``optimization.execution_accelerators``), as the NGC container serves it.
* ``tensorrt``: prebuilt FP16 TensorRT engines (``platform: tensorrt_plan``), written by
  :mod:`export.tensorrt_engines` on a GPU node.

The config is built as Triton's own ``ModelConfig`` protobuf, so a misspelt field cannot be
written. Tensor names, dtypes and dims written here are the single source of truth that
the gateway and the python-backend model read back.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

TARGETS = ("cpu", "gpu", "tensorrt")
PLAN_FILENAME = "model.plan"
ONNX_FILENAME = "model.onnx"


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]  # without the batch axis when max_batch_size > 0
    dtype: str = "TYPE_FP32"


@dataclass(frozen=True)
class RepositoryModel:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int = 0
    dynamic_batching: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    parameters: dict[str, str] = field(default_factory=dict)


def build_config(model: RepositoryModel, target: str, instances: int = 1) -> mc.ModelConfig:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    cfg = mc.ModelConfig(name=model.name, max_batch_size=model.max_batch_size)
    for spec, repeated in ((model.inputs, cfg.input), (model.outputs, cfg.output)):
        for t in spec:
            repeated.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=list(t.dims))
    cfg.version_policy.latest.num_versions = 1
    if model.dynamic_batching and model.max_batch_size > 0:
        cfg.dynamic_batching.max_queue_delay_microseconds = model.max_queue_delay_us
        cfg.dynamic_batching.preferred_batch_size.extend(model.preferred_batch_sizes)
    params = dict(model.parameters)
    params["medseg.target"] = target
    if target == "cpu":
        cfg.backend = "python"
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
        params["onnx_filename"] = ONNX_FILENAME
    elif target == "tensorrt":
        cfg.backend = "tensorrt"
        cfg.platform = "tensorrt_plan"
        cfg.default_model_filename = PLAN_FILENAME
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
    else:
        cfg.backend = "onnxruntime"
        cfg.default_model_filename = ONNX_FILENAME
        cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16"
        trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
        trt.parameters["trt_engine_cache_enable"] = "1"
    for key in sorted(params):
        cfg.parameters[key].string_value = params[key]
    return cfg


def render_config(model: RepositoryModel, target: str, instances: int = 1) -> str:
    header = (
        "# Written by `python -m export` (export/triton_config.py); do not edit by hand.\n"
        f"# Target: {target}. Tensor names, dtypes and dims here are the single source of truth.\n"
    )
    return header + text_format.MessageToString(build_config(model, target, instances))


PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
# The gateway's runtime module, shipped beside model.py so both paths run a model alike.
RUNTIMES_MODULE = Path(__file__).resolve().parents[1] / "service" / "backends" / "runtimes.py"


def write_config(repository: Path, model: RepositoryModel, target: str, instances: int = 1, version: int = 1) -> Path:
    """Write ``<repository>/<model>/config.pbtxt``; for the cpu target also the python-backend
    ``<version>/model.py`` that runs the ONNX file beside it, with ``medseg_runtimes.py``."""
    path = repository / model.name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_config(model, target, instances))
    if target == "cpu":
        version_dir = path.parent / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PYTHON_MODEL, version_dir / "model.py")
        shutil.copyfile(RUNTIMES_MODULE, version_dir / "medseg_runtimes.py")
    return path


def read_config(path: Path) -> mc.ModelConfig:
    """Parse a ``config.pbtxt`` with Triton's own schema (raises on unknown fields)."""
    return text_format.Parse(path.read_text(), mc.ModelConfig())
