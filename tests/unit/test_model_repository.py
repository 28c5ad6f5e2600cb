"""Every config.pbtxt parses with Triton's own schema and matches the model file beside it (ONNX,
or OpenVINO IR for the static INT8 encoder)."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto
from tritonclient.grpc import model_config_pb2 as mc

from google.protobuf import text_format

from service.backends.repository import RepositoryEntry
from tests.harness import MODEL_REPOSITORY, ensure_models

_ONNX_TO_TRITON = {TensorProto.FLOAT: "TYPE_FP32", TensorProto.FLOAT16: "TYPE_FP16", TensorProto.INT64: "TYPE_INT64",
                   TensorProto.INT32: "TYPE_INT32", TensorProto.UINT8: "TYPE_UINT8", TensorProto.BOOL: "TYPE_BOOL"}
CONFIGS = sorted(MODEL_REPOSITORY.glob("*/config.pbtxt"))


@pytest.fixture(scope="module")
def repository() -> Path:
    return ensure_models()


def _onnx_dims(value_info) -> list[int]:
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


_OPENVINO_TO_TRITON = {"f32": "TYPE_FP32", "f16": "TYPE_FP16", "i64": "TYPE_INT64", "i32": "TYPE_INT32",
                       "u8": "TYPE_UINT8", "boolean": "TYPE_BOOL"}
Port = tuple[frozenset, str, list]  # (tensor names, Triton data type, dims with -1 for dynamic)


def _ports(model_file: Path) -> tuple[list[Port], list[Port]]:
    """(inputs, outputs) of an ONNX file, or of OpenVINO IR (an IR port may carry several names)."""
    if model_file.suffix == ".xml":
        import openvino as ov

        model = ov.Core().read_model(str(model_file))

        def ports(items) -> list[Port]:
            return [(frozenset(p.get_names()), _OPENVINO_TO_TRITON[p.get_element_type().get_type_name()],
                     [d.get_length() if d.is_static else -1 for d in p.get_partial_shape()]) for p in items]

        return ports(model.inputs), ports(model.outputs)
    graph = onnx.load(str(model_file), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}

    def values(items) -> list[Port]:
        return [(frozenset([v.name]), _ONNX_TO_TRITON[v.type.tensor_type.elem_type], _onnx_dims(v)) for v in items
                if v.name not in initializers]

    return values(graph.input), values(graph.output)


@pytest.mark.parametrize("config_path", CONFIGS, ids=lambda p: p.parent.name)
def test_config_matches_the_onnx_file_beside_it(repository, config_path):
    cfg = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    RepositoryEntry.read(config_path.parent)  # the gateway's schema reads it too
    assert cfg.name == config_path.parent.name
    model_file = config_path.parent / "1" / (cfg.parameters["onnx_filename"].string_value
                                             if "onnx_filename" in cfg.parameters else cfg.default_model_filename)
    if not model_file.is_file():
        pytest.fail(f"{model_file} missing: export it (python -m export ...) before running the tests")
    inputs, outputs = _ports(model_file)
    for declared, actual in ((cfg.input, inputs), (cfg.output, outputs)):
        matched = [next((port for port in actual if t.name in port[0]), None) for t in declared]
        assert None not in matched and len(declared) == len(actual), "tensor names differ"
        for t, (_, dtype, dims) in zip(declared, matched):
            assert mc.DataType.Name(t.data_type) == dtype, t.name
            if cfg.max_batch_size > 0:
                assert dims[0] == -1, f"{t.name}: the batch axis must be dynamic in the ONNX file"
                dims = dims[1:]
            assert len(dims) == len(t.dims), f"{t.name}: rank {len(dims)} vs config {len(t.dims)}"
            for have, want in zip(dims, t.dims):
                # config -1: the ONNX axis must be dynamic too (else clients may send shapes that fail);
                # a fixed config dim must equal the ONNX dim, which may be symbolic (e.g. after a reshape).
                ok = have == -1 if want == -1 else have in (want, -1)
                assert ok, f"{t.name}: ONNX dims {dims} vs config {list(t.dims)}"
    if cfg.backend == "python":
        assert (config_path.parent / "1" / "model.py").is_file()


def test_committed_litemedsam_configs_are_what_the_exporter_writes():
    from export.medsam_lite import medsam_lite_entries

    for entry in medsam_lite_entries():
        committed = (MODEL_REPOSITORY / entry.name / "config.pbtxt").read_text()
        assert committed == entry.render("cpu"), f"{entry.name}: re-run `python -m export medsam_lite`"


def test_gpu_target_uses_the_onnxruntime_backend_with_tensorrt_fp16():
    from export.medsam_lite import medsam_lite_entries

    encoder, _ = medsam_lite_entries()
    cfg = encoder.to_config("gpu")
    assert cfg.backend == "onnxruntime" and cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    assert cfg.dynamic_batching.max_queue_delay_microseconds > 0 and cfg.max_batch_size > 1
