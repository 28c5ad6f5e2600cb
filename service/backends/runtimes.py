"""In-process inference runtimes for one ONNX file: ONNX Runtime or OpenVINO.

A repository entry chooses its runtime in ``config.pbtxt`` (the same parameters the Triton
python-backend ``model.py`` reads, so both paths run a model the same way):

* ``inference_runtime``: ``onnxruntime`` (default) or ``openvino``;
* ``inference_precision`` (OpenVINO only): ``fp32`` (default) or ``bf16``. BF16 runs on CPUs
  with native BF16 instructions (AVX512-BF16, AMX); elsewhere OpenVINO computes in fp32;
* ``ort_intra_op_threads``: threads per call for either runtime (0: all cores);
* ``ort_allow_spinning`` (ONNX Runtime only): ``0`` (default) or ``1``. Spinning worker threads
  keep the cores busy for a while after each call; in the gateway the next call is usually on
  another session (decoder after encoder, OpenVINO after ONNX Runtime) or gRPC work, which they
  slow down (measured: an OpenVINO BF16 encoder call right after a spinning ONNX Runtime
  decoder call took 166 instead of 150 ms; encoder + decoder on ONNX Runtime alone: equal).

Both sessions expose ``input_names``, ``output_names`` and ``run(output_names, feeds) ->
list[np.ndarray]``, and may be called from several threads at once.
"""

from __future__ import annotations

import logging
import queue
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

log = logging.getLogger(__name__)

# The config.pbtxt parameter keys this module reads (typed in service.backends.repository.RuntimeParameters).
RUNTIME = "inference_runtime"
PRECISION = "inference_precision"
THREADS = "ort_intra_op_threads"
SPINNING = "ort_allow_spinning"
ONNX_FILENAME = "onnx_filename"

RUNTIMES = ("onnxruntime", "openvino")
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


class ModelSession(Protocol):
    input_names: list[str]
    output_names: list[str]

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtSession:
    """ONNX Runtime on the CPU, graph optimisation level ALL."""

    def __init__(self, path: Path, threads: int = 0, allow_spinning: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        if threads:
            options.intra_op_num_threads = threads
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self._session.get_inputs()]
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._session.run(output_names, feeds)


class OpenVinoSession:
    """OpenVINO on the CPU in latency mode.

    With ``batch_axis`` (Triton ``max_batch_size > 0``) the model is compiled once per batch
    size with static shapes (measured faster than a dynamic-shape compile), batch 1 at load
    and others on first use; otherwise it is compiled with the file's own (dynamic) shapes.
    Each compiled model keeps a pool of infer requests so concurrent calls never share one.
    """

    def __init__(self, path: Path, threads: int = 0, precision: str = "fp32", batch_axis: bool = False) -> None:
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"inference_precision {precision!r} is not one of {sorted(PRECISIONS)}")
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        self._config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = threads
        if precision == "bf16" and "BF16" not in self._core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log.warning("%s: this CPU has no native BF16; OpenVINO computes it in fp32", path.name)
        self.input_names = [p.get_any_name() for p in self._model.inputs]
        self.output_names = [p.get_any_name() for p in self._model.outputs]
        self._output_index = {name: i for i, p in enumerate(self._model.outputs) for name in p.get_names()}
        self._batch_axis = batch_axis
        self._compiled: dict[int, tuple[object, queue.SimpleQueue]] = {}
        self._lock = threading.Lock()
        self._get(1 if batch_axis else 0)

    def _get(self, batch: int) -> tuple[object, queue.SimpleQueue]:
        with self._lock:
            if batch not in self._compiled:
                model = self._model
                if self._batch_axis:
                    import openvino as ov

                    model = self._model.clone()
                    model.reshape({p.get_any_name(): ov.PartialShape([ov.Dimension(batch),
                                                                      *list(p.get_partial_shape())[1:]])
                                   for p in model.inputs})
                self._compiled[batch] = (self._core.compile_model(model, "CPU", self._config), queue.SimpleQueue())
            return self._compiled[batch]

    def prepare(self, batch_sizes: list[int]) -> None:
        """Compile these batch sizes now (e.g. Triton's preferred batch sizes) rather than on
        the first request that brings one."""
        for batch in batch_sizes if self._batch_axis else []:
            self._get(int(batch))

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batch = next(iter(feeds.values())).shape[0] if self._batch_axis else 0
        compiled, pool = self._get(batch)
        try:
            request = pool.get_nowait()
        except queue.Empty:
            request = compiled.create_infer_request()
        try:
            results = request.infer(feeds)  # copies the outputs (share_outputs=False)
            return [results[self._output_index[name]] for name in output_names]
        finally:
            pool.put(request)


def runtime_of(parameters: dict[str, str]) -> str:
    """The runtime a config.pbtxt's parameters name (``onnxruntime`` when none)."""
    return parameters.get(RUNTIME, "") or "onnxruntime"


def open_session(path: Path, parameters: dict[str, str], threads: int = 0, batch_axis: bool = False) -> ModelSession:
    """The session ``parameters`` (a config.pbtxt's) ask for; ``threads`` overrides their hint."""
    runtime = runtime_of(parameters)
    if runtime not in RUNTIMES:
        raise ValueError(f"{RUNTIME} {runtime!r} is not one of {RUNTIMES}")
    threads = threads or int(parameters.get(THREADS, "0") or 0)
    path = Path(path)
    if runtime == "openvino":
        return OpenVinoSession(path, threads, parameters.get(PRECISION, "fp32") or "fp32", batch_axis)
    return OrtSession(path, threads, parameters.get(SPINNING, "0") == "1")
