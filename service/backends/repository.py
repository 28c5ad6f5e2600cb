"""The model repository schema: one pair of dataclasses that both renders and reads ``config.pbtxt``.

:class:`RepositoryEntry` is one Triton model (one folder of the repository) with its tensors
(:class:`TensorSpec`), batching, and two typed parameter groups:

* :class:`GatewayParameters`: the gateway's model metadata, stored as ``medseg.*`` parameters
  (model name, role, version, input size, prompt kinds, shared decoder, ...);
* :class:`RuntimeParameters`: how the in-process runtimes run the ONNX file (the keys that
  :mod:`service.backends.runtimes` and the Triton python-backend ``model.py`` read).

The exporters build entries and :meth:`RepositoryEntry.render` them; the gateway and the tools
:meth:`RepositoryEntry.read` them back, so the two sides cannot drift apart. The text is Triton's
own ``ModelConfig`` protobuf: a misspelt field cannot be written, and reading rejects unknown
fields as well as unknown ``medseg.*`` keys.

Render targets:

* ``cpu``: Triton's python backend running the ONNX file in process (what the
  ``nvidia-pytriton`` tritonserver on a CPU machine loads); the embedded backend reads the same file.
* ``gpu``: Triton's native ``onnxruntime`` backend on GPU instances with TensorRT FP16 acceleration.
* ``tensorrt``: prebuilt TensorRT engines (``platform: tensorrt_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.backends import runtimes
from service.core.domain import ModelInfo, PromptKind
from service.core.geometry import check_preprocessing

TARGETS = ("cpu", "gpu", "tensorrt")
ONNX_FILENAME = "model.onnx"
PLAN_FILENAME = "model.plan"
HEADER = ("# Written by `python -m export` (service/backends/repository.py); do not edit by hand.\n"
          "# Target: {target}. Tensor names, dtypes and dims here are the single source of truth.\n")

_NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64,
                 "TYPE_INT32": np.int32, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}


class Role:
    """Values of ``medseg.role``."""

    IMAGE_ENCODER = "image_encoder"
    PROMPT_DECODER = "prompt_decoder"
    SEGMENTER = "segmenter"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # as in config.pbtxt: without the batch axis when max_batch_size > 0
    dtype: str = "TYPE_FP32"

    @property
    def numpy_dtype(self) -> type:
        return _NUMPY_DTYPES[self.dtype]


def _kinds_text(kinds: frozenset[PromptKind]) -> str:
    order = [PromptKind.BOX, PromptKind.POINT, PromptKind.MASK]
    return ",".join(k.value for k in order if k in kinds)


def _kinds(text: str) -> frozenset[PromptKind]:
    return frozenset(PromptKind(k.strip()) for k in text.split(",") if k.strip())


@dataclass(frozen=True)
class GatewayParameters:
    """The ``medseg.*`` parameters: what the gateway serves an entry as.

    An image encoder and a prompt decoder with the same ``model`` form one promptable model; an
    encoder may name another model's decoder in ``decoder`` (an encoder variant sharing the fp32
    decoder). A ``segmenter`` is a prompt-free model on its own. ``target`` is written by
    :meth:`RepositoryEntry.render`.
    """

    model: str = ""
    role: str = ""
    version: str = "1"
    input_size: int = 0
    prompt_kinds: frozenset[PromptKind] = frozenset()
    required_prompt_kinds: frozenset[PromptKind] = frozenset()
    description: str = ""
    decoder: str = ""
    structure: str = ""
    weights_sha256: str = ""
    # how an image is placed in the square input (service.core.geometry.PREPROCESSINGS)
    preprocessing: str = ""
    # bytes of memory the entry takes loaded and run once, measured at export (0: not measured)
    memory_bytes: int = 0
    # a 2.5-D segmenter: neighbouring slices on each side given as input channels
    # (service.core.segmenter_io.context_indices); 0: one slice (2-D)
    context_slices: int = 0
    target: str = ""

    _PREFIX = "medseg."

    def to_parameters(self) -> dict[str, str]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "model" and not value:
                return {}  # not a gateway model at all: no medseg.* keys
            if f.name in ("prompt_kinds", "required_prompt_kinds"):
                # a prompt-free segmenter says so with an empty prompt_kinds; a decoder says nothing
                if value or (f.name == "prompt_kinds" and self.role != Role.PROMPT_DECODER):
                    out[self._PREFIX + f.name] = _kinds_text(value)
                continue
            if value in ("", 0) and f.name not in ("version",):
                continue
            out[self._PREFIX + f.name] = str(value)
        return out

    @classmethod
    def from_parameters(cls, params: dict[str, str], where: str = "config.pbtxt") -> "GatewayParameters":
        known = {f.name for f in fields(cls)}
        values: dict = {}
        for key, text in params.items():
            if not key.startswith(cls._PREFIX):
                continue
            name = key[len(cls._PREFIX):]
            if name not in known:
                raise ValueError(f"{where}: unknown parameter {key!r} (known: "
                                 f"{', '.join(cls._PREFIX + k for k in sorted(known))})")
            if name in ("prompt_kinds", "required_prompt_kinds"):
                values[name] = _kinds(text)
            elif name in ("input_size", "memory_bytes", "context_slices"):
                try:
                    values[name] = int(text)
                except ValueError:
                    raise ValueError(f"{where}: parameter {key!r} must be an integer, not {text!r}") from None
            else:
                values[name] = text
        return cls(**values)


@dataclass(frozen=True)
class RuntimeParameters:
    """How the in-process runtimes run an entry's ONNX file (see :mod:`service.backends.runtimes`)."""

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    intra_op_threads: int = 0
    allow_spinning: bool = False
    onnx_filename: str = ONNX_FILENAME

    def to_parameters(self) -> dict[str, str]:
        default = RuntimeParameters()
        out = {}
        if self.runtime != default.runtime:
            out[runtimes.RUNTIME] = self.runtime
        if self.precision != default.precision:
            out[runtimes.PRECISION] = self.precision
        if self.intra_op_threads:
            out[runtimes.THREADS] = str(self.intra_op_threads)
        if self.allow_spinning:
            out[runtimes.SPINNING] = "1"
        return out

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> "RuntimeParameters":
        return cls(runtime=runtimes.runtime_of(params),
                   precision=params.get(runtimes.PRECISION, "") or "fp32",
                   intra_op_threads=int(params.get(runtimes.THREADS, "0") or 0),
                   allow_spinning=params.get(runtimes.SPINNING, "0") == "1",
                   onnx_filename=params.get(runtimes.ONNX_FILENAME, "") or ONNX_FILENAME)


_RUNTIME_KEYS = (runtimes.RUNTIME, runtimes.PRECISION, runtimes.THREADS, runtimes.SPINNING, runtimes.ONNX_FILENAME)


@dataclass(frozen=True)
class RepositoryEntry:
    """One Triton model: what ``config.pbtxt`` says, typed. ``path``: its folder, once read or written."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int = 0
    dynamic_batching: bool = False
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    gateway: GatewayParameters = field(default_factory=GatewayParameters)
    runtime: RuntimeParameters = field(default_factory=RuntimeParameters)
    path: Path | None = None

    # ------------------------------------------------------------------ views
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def tensor(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no tensor {name!r} (inputs {self.input_names}, outputs {self.output_names})")

    @property
    def parameters(self) -> dict[str, str]:
        """The runtime parameters as the runtimes read them (also what ``model.py`` gets from Triton)."""
        return self.runtime.to_parameters()

    def onnx_path(self, version: int = 1) -> Path:
        if self.path is None:
            raise ValueError(f"entry {self.name!r} has no folder yet")
        return self.path / str(version) / self.runtime.onnx_filename

    # ------------------------------------------------------------------ render
    def to_config(self, target: str, instances: int = 1) -> mc.ModelConfig:
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        cfg = mc.ModelConfig(name=self.name, max_batch_size=self.max_batch_size)
        for spec, repeated in ((self.inputs, cfg.input), (self.outputs, cfg.output)):
            for t in spec:
                repeated.add(name=t.name, data_type=mc.DataType.Value(t.dtype), dims=list(t.dims))
        cfg.version_policy.latest.num_versions = 1
        if self.dynamic_batching and self.max_batch_size > 0:
            cfg.dynamic_batching.max_queue_delay_microseconds = self.max_queue_delay_us
            cfg.dynamic_batching.preferred_batch_size.extend(self.preferred_batch_sizes)
        params = self.runtime.to_parameters()
        if self.gateway.model:
            params.update(GatewayParameters(**{**_asdict(self.gateway), "target": target}).to_parameters())
        if target == "cpu":
            cfg.backend = "python"
            cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
            params[runtimes.ONNX_FILENAME] = self.runtime.onnx_filename
        elif target == "tensorrt":
            cfg.backend = "tensorrt"
            cfg.platform = "tensorrt_plan"
            cfg.default_model_filename = PLAN_FILENAME
            cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
        else:
            cfg.backend = "onnxruntime"
            cfg.default_model_filename = self.runtime.onnx_filename
            cfg.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=instances)
            trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            trt.parameters["max_workspace_size_bytes"] = str(1 << 30)
            trt.parameters["trt_engine_cache_enable"] = "1"
        for key in sorted(params):
            cfg.parameters[key].string_value = params[key]
        return cfg

    def render(self, target: str, instances: int = 1) -> str:
        return HEADER.format(target=target) + text_format.MessageToString(self.to_config(target, instances))

    # ------------------------------------------------------------------ read
    @classmethod
    def from_config(cls, cfg: mc.ModelConfig, path: Path | None = None) -> "RepositoryEntry":
        where = str(path / "config.pbtxt") if path is not None else f"{cfg.name}/config.pbtxt"
        params = {k: v.string_value for k, v in cfg.parameters.items()}

        def tensors(items) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t.name, tuple(t.dims), mc.DataType.Name(t.data_type)) for t in items)

        batching = cfg.HasField("dynamic_batching")
        return cls(
            name=cfg.name or (path.name if path is not None else ""),
            inputs=tensors(cfg.input), outputs=tensors(cfg.output), max_batch_size=cfg.max_batch_size,
            dynamic_batching=batching,
            preferred_batch_sizes=tuple(cfg.dynamic_batching.preferred_batch_size) if batching else (),
            max_queue_delay_us=cfg.dynamic_batching.max_queue_delay_microseconds if batching else 2000,
            gateway=GatewayParameters.from_parameters(params, where),
            runtime=RuntimeParameters.from_parameters({k: v for k, v in params.items() if k in _RUNTIME_KEYS}),
            path=path)

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> "RepositoryEntry":
        """Parse config.pbtxt text with Triton's own schema (raises on unknown fields)."""
        return cls.from_config(text_format.Parse(text, mc.ModelConfig()), path)

    @classmethod
    def read(cls, folder: Path) -> "RepositoryEntry":
        folder = Path(folder)
        return cls.parse((folder / "config.pbtxt").read_text(), folder)


def _asdict(params: GatewayParameters) -> dict:
    return {f.name: getattr(params, f.name) for f in fields(params)}


def read_entry(folder: Path) -> RepositoryEntry:
    return RepositoryEntry.read(folder)


# --------------------------------------------------------------------------- gateway models
class SamModel(NamedTuple):
    """A promptable model served as an image encoder + a prompt decoder."""

    info: ModelInfo
    encoder: RepositoryEntry
    decoder: RepositoryEntry


class SegmenterModel(NamedTuple):
    """A prompt-free segmenter: one repository entry, image in, logits out."""

    info: ModelInfo
    entry: RepositoryEntry

    @property
    def structure(self) -> str:
        return self.entry.gateway.structure or "its structure"

    @property
    def context(self) -> int:
        """Neighbouring slices on each side in its input (0: a 2-D segmenter; see
        :mod:`service.core.segmenter_io`); the value ListModels shows."""
        return self.info.context_slices


def check_segmenter_input(entry: RepositoryEntry) -> None:
    """A segmenter's input has ``2 * medseg.context_slices + 1`` channels."""
    context = entry.gateway.context_slices
    if context < 0:
        raise ValueError(f"{entry.name}/config.pbtxt: medseg.context_slices must be >= 0, not {context}")
    dims = entry.inputs[0].dims if entry.inputs else ()
    channels = dims[-3] if len(dims) >= 3 else None    # (C, S, S), after a batch axis if there is one
    if channels is not None and channels not in (-1, 2 * context + 1):
        raise ValueError(f"{entry.name}/config.pbtxt: input {entry.inputs[0].name!r} has {channels} channels; with "
                         f"medseg.context_slices {context} it takes {2 * context + 1} (the slice and {context} "
                         "neighbours on each side)")


def model_info(name: str, params: GatewayParameters, default_model: str, mask_candidates: int = 1) -> ModelInfo:
    if params.input_size <= 0:
        raise ValueError(f"model {name!r}: medseg.input_size must be a positive integer")
    check_preprocessing(params.preprocessing)
    return ModelInfo(name=name, version=params.version, input_size=params.input_size,
                     prompt_kinds=params.prompt_kinds, required_prompt_kinds=params.required_prompt_kinds,
                     description=params.description, is_default=(name == default_model),
                     mask_candidates=mask_candidates, context_slices=params.context_slices)


def mask_candidates(decoder: RepositoryEntry) -> int:
    """Candidates per prompt a prompt decoder answers with: its mask output has 1 channel
    (one mask), or SAM's 4 (the single-mask token, then the 3 multimask candidates)."""
    dims = decoder.tensor(decoder.output_names[0]).dims
    channels = dims[1] if len(dims) == 4 else 1
    if channels not in (1, 4):
        raise ValueError(f"{decoder.name}/config.pbtxt: mask output with {channels} channels; the gateway "
                         "serves 1 (one mask) or 4 (SAM's single-mask token + 3 candidates)")
    return 1 if channels == 1 else 3


def discover(repository: Path, default_model: str) -> dict[str, SamModel | SegmenterModel]:
    """All gateway models in ``repository`` keyed by name (entries grouped by ``medseg.model``)."""
    entries = [RepositoryEntry.read(p.parent) for p in sorted(Path(repository).glob("*/config.pbtxt"))]
    by_model: dict[str, dict[str, RepositoryEntry]] = {}
    for e in entries:
        if e.gateway.model:
            by_model.setdefault(e.gateway.model, {})[e.gateway.role] = e
    by_name = {e.name: e for e in entries}
    models: dict[str, SamModel | SegmenterModel] = {}
    for name, roles in by_model.items():
        if Role.SEGMENTER in roles:
            entry = roles[Role.SEGMENTER]
            check_segmenter_input(entry)
            models[name] = SegmenterModel(model_info(name, entry.gateway, default_model), entry)
            continue
        enc = roles.get(Role.IMAGE_ENCODER)
        if enc is None:
            continue
        # An encoder may share another model's prompt decoder (e.g. an INT8 encoder variant).
        dec = by_name.get(enc.gateway.decoder) if enc.gateway.decoder else roles.get(Role.PROMPT_DECODER)
        if dec is None:
            continue
        models[name] = SamModel(model_info(name, enc.gateway, default_model, mask_candidates(dec)), enc, dec)
    return models
