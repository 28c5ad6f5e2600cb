"""Reads the model repository's ``config.pbtxt`` files: the single source of truth for
tensor names, dtypes and dims, and (in ``medseg.*`` parameters) the gateway's model metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from service.core.domain import ModelInfo, PromptKind

_NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_INT64": np.int64,
                 "TYPE_INT32": np.int32, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: type
    dims: tuple[int, ...]  # as in config.pbtxt (no batch axis when max_batch_size > 0)


@dataclass(frozen=True)
class RepositoryEntry:
    """One Triton model (one folder of the repository)."""

    name: str
    path: Path
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    parameters: dict[str, str]

    def onnx_path(self, version: int = 1) -> Path:
        return self.path / str(version) / self.parameters.get("onnx_filename", "model.onnx")

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]


@dataclass(frozen=True)
class SamModel:
    """A promptable model served as an image encoder + a prompt decoder."""

    info: ModelInfo
    encoder: RepositoryEntry
    decoder: RepositoryEntry


@dataclass(frozen=True)
class SegmenterModel:
    """A prompt-free segmenter: one repository entry, image in, logits out."""

    info: ModelInfo
    entry: RepositoryEntry

    @property
    def structure(self) -> str:
        return self.entry.parameters.get("medseg.structure", "its structure")


def _tensors(items) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(t.name, _NUMPY_DTYPES[mc.DataType.Name(t.data_type)], tuple(t.dims)) for t in items)


def read_entry(folder: Path) -> RepositoryEntry:
    cfg = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    return RepositoryEntry(cfg.name or folder.name, folder, _tensors(cfg.input), _tensors(cfg.output),
                           cfg.max_batch_size, params)


def _kinds(text: str) -> frozenset[PromptKind]:
    return frozenset(PromptKind(k.strip()) for k in text.split(",") if k.strip())


def _info(name: str, p: dict[str, str], default_model: str) -> ModelInfo:
    return ModelInfo(name=name, version=p.get("medseg.version", "1"), input_size=int(p["medseg.input_size"]),
                     prompt_kinds=_kinds(p.get("medseg.prompt_kinds", "")),
                     required_prompt_kinds=_kinds(p.get("medseg.required_prompt_kinds", "")),
                     description=p.get("medseg.description", ""), is_default=(name == default_model))


def discover(repository: Path, default_model: str) -> dict[str, SamModel | SegmenterModel]:
    """All gateway models in ``repository`` keyed by name (entries grouped by ``medseg.model``)."""
    entries = [read_entry(p.parent) for p in sorted(Path(repository).glob("*/config.pbtxt"))]
    by_model: dict[str, dict[str, RepositoryEntry]] = {}
    for e in entries:
        if "medseg.model" in e.parameters:
            by_model.setdefault(e.parameters["medseg.model"], {})[e.parameters.get("medseg.role", "")] = e
    by_name = {e.name: e for e in entries}
    models = {}
    for name, roles in by_model.items():
        if "segmenter" in roles:
            models[name] = SegmenterModel(_info(name, roles["segmenter"].parameters, default_model),
                                          roles["segmenter"])
            continue
        enc = roles.get("image_encoder")
        if enc is None:
            continue
        # An encoder may share another model's prompt decoder (e.g. an INT8 encoder variant).
        shared = enc.parameters.get("medseg.decoder")
        dec = by_name.get(shared) if shared else roles.get("prompt_decoder")
        if dec is None:
            continue
        models[name] = SamModel(_info(name, enc.parameters, default_model), enc, dec)
    return models
