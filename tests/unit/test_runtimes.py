"""The in-process runtimes (service/backends/runtimes.py) on small generated ONNX models:
OpenVINO answers like ONNX Runtime, per batch size and from several threads, and BF16 really
runs in BF16 where the CPU has it."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.triton_config import write_config
from service.backends.repository import RepositoryEntry, RuntimeParameters, TensorSpec
from service.core import errors
from service.backends.embedded import EmbeddedBackend
from service.backends.runtimes import OpenVinoSession, OrtSession, open_session

ov = pytest.importorskip("openvino", reason="OpenVINO is not installed")
HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _write_mlp(path: Path, features: int = 64) -> Path:
    """x (B, features) -> logits = relu(x @ W1 + b) @ W2, probs = softmax(logits); B dynamic."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((features, 128)).astype(np.float32), "W1")
    b1 = numpy_helper.from_array(rng.standard_normal(128).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((128, 16)).astype(np.float32), "W2")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "b1"], ["hb"]),
             helper.make_node("Relu", ["hb"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", features])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 16]),
                               helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["B", 16])],
                              initializer=[w1, b1, w2])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture
def mlp(tmp_path) -> Path:
    return _write_mlp(tmp_path / "mlp.onnx")


def test_openvino_fp32_answers_like_onnx_runtime_in_the_order_asked(mlp):
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    want = OrtSession(mlp).run(["probs", "logits"], {"x": x})
    got = OpenVinoSession(mlp, threads=1).run(["probs", "logits"], {"x": x})
    assert [g.shape for g in got] == [(3, 16), (3, 16)]
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-3)


def test_openvino_batched_model_compiles_each_batch_size_and_serves_threads_at_once(mlp):
    session = OpenVinoSession(mlp, batch_axis=True)
    reference = OrtSession(mlp)
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal((1 + i % 3, 64)).astype(np.float32) for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda x: session.run(["logits"], {"x": x})[0], inputs))
    for x, out in zip(inputs, outputs):
        np.testing.assert_allclose(out, reference.run(["logits"], {"x": x})[0], rtol=1e-4, atol=1e-3)
    assert set(session._compiled) == {1, 2, 3}
    session.prepare([4])
    assert set(session._compiled) == {1, 2, 3, 4}


@pytest.mark.skipif(not HAS_BF16, reason="this CPU has no native BF16 (AVX512-BF16 or AMX)")
def test_bf16_precision_really_computes_in_bf16(mlp):
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    want = OrtSession(mlp).run(["logits"], {"x": x})[0]
    got = OpenVinoSession(mlp, precision="bf16").run(["logits"], {"x": x})[0]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert 1e-5 < rel < 3e-2  # BF16 rounding (8-bit mantissa): visibly not fp32, still close


@pytest.mark.parametrize("params", [{"inference_runtime": "tensorflow"},
                                    {"inference_runtime": "openvino", "inference_precision": "fp8"}])
def test_unknown_runtime_or_precision_is_a_clear_error(mlp, params):
    with pytest.raises(ValueError, match="inference_"):
        open_session(mlp, params)


def test_threads_hint_from_config_and_default_runtime(mlp):
    assert isinstance(open_session(mlp, {"ort_intra_op_threads": "1"}), OrtSession)
    session = open_session(mlp, {"inference_runtime": "openvino", "ort_intra_op_threads": "1"})
    assert isinstance(session, OpenVinoSession) and session._config["INFERENCE_NUM_THREADS"] == 1


def _entry(name: str, params: dict[str, str]) -> RepositoryEntry:
    return RepositoryEntry(name=name, inputs=(TensorSpec("x", (64,)),),
                           outputs=(TensorSpec("logits", (16,)), TensorSpec("probs", (16,))), max_batch_size=4,
                           runtime=RuntimeParameters.from_parameters(params))


def test_embedded_backend_runs_each_entry_on_the_runtime_its_config_names(tmp_path):
    repo = tmp_path / "repo"
    for name, params in (("on_ort", {}), ("on_ov", {"inference_runtime": "openvino"})):
        write_config(repo, _entry(name, params), "cpu")
        _write_mlp(repo / name / "1" / "model.onnx")
        # The Triton python model gets the same runtime module beside it.
        assert (repo / name / "1" / "medseg_runtimes.py").is_file()
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)

    async def run() -> list[np.ndarray]:
        backend = EmbeddedBackend(repo, threads=1)
        await backend.start(["on_ort", "on_ov"])
        try:
            assert isinstance(backend._sessions["on_ov"], OpenVinoSession)
            return [(await backend.infer(m, {"x": x}, ["probs"]))["probs"] for m in ("on_ort", "on_ov")]
        finally:
            await backend.close()

    ort_out, ov_out = asyncio.run(run())
    np.testing.assert_allclose(ov_out, ort_out, atol=1e-5)


def test_embedded_backend_reports_a_bad_runtime_in_config_as_unavailable(tmp_path):
    repo = tmp_path / "repo"
    write_config(repo, _entry("bad", {"inference_runtime": "tensorflow"}), "cpu")
    _write_mlp(repo / "bad" / "1" / "model.onnx")

    async def run() -> None:
        backend = EmbeddedBackend(repo, threads=1)
        try:
            await backend.start(["bad"])
        finally:
            await backend.close()

    with pytest.raises(errors.Unavailable, match="inference_runtime"):
        asyncio.run(run())
