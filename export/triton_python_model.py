"""Triton python-backend model running an ONNX file in process (the CPU target).

``python -m export`` copies this file to ``<model>/<version>/model.py`` and the gateway's
runtime module (service/backends/runtimes.py) beside it as ``medseg_runtimes.py``, so a model
runs on the same runtime, precision and threads through Triton as in the embedded backend.
Tensor names and dtypes come from the model's own ``config.pbtxt`` (passed in
``args["model_config"]``), never from this file. With ``max_batch_size > 0`` all requests of
one dynamic batch are concatenated along the batch axis and run in one call.

Parameters read from config.pbtxt: ``onnx_filename`` (default model.onnx),
``inference_runtime`` (onnxruntime or openvino), ``inference_precision`` (fp32 or bf16,
OpenVINO) and ``ort_intra_op_threads``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils  # provided by the python backend

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from medseg_runtimes import ONNX_FILENAME, open_session  # noqa: E402 - shipped beside this file


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], params.get(ONNX_FILENAME, "") or "model.onnx")
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.session = open_session(path, params, batch_axis=self.batched)
        if hasattr(self.session, "prepare"):  # OpenVINO: compile the dynamic batcher's batch sizes at load
            self.session.prepare(config.get("dynamic_batching", {}).get("preferred_batch_size", []))
        self.inputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["input"]]
        self.outputs = [(t["name"], pb_utils.triton_string_to_numpy(t["data_type"])) for t in config["output"]]
        served = set(self.session.input_names)
        if served != {name for name, _ in self.inputs}:
            raise pb_utils.TritonModelException(f"{path}: ONNX inputs {sorted(served)} differ from config.pbtxt")

    def _feeds(self, request) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"missing input {name}")
            feeds[name] = tensor.as_numpy().astype(dtype, copy=False)
        return feeds

    def _responses(self, results: list[np.ndarray]):
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(r.astype(dtype, copy=False)))
                   for (name, dtype), r in zip(self.outputs, results)]
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def execute(self, requests):
        names = [name for name, _ in self.outputs]
        responses: list = [None] * len(requests)
        feeds, good = [], []
        for i, request in enumerate(requests):
            try:
                feeds.append(self._feeds(request))
                good.append(i)
            except Exception as exc:  # noqa: BLE001 - answered as a per-request error
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad input: {exc}"))
        if not good:
            return responses
        try:
            if self.batched and len(good) > 1:
                sizes = [next(iter(f.values())).shape[0] for f in feeds]
                joined = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
                results = self.session.run(names, joined)
                offsets = np.cumsum([0, *sizes])
                for k, i in enumerate(good):
                    responses[i] = self._responses([r[offsets[k]:offsets[k + 1]] for r in results])
            else:
                for f, i in zip(feeds, good):
                    responses[i] = self._responses(self.session.run(names, f))
        except Exception as exc:  # noqa: BLE001 - runtime errors become request errors
            for i in good:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"inference failed: {exc}"))
        return responses

    def finalize(self) -> None:
        self.session = None
