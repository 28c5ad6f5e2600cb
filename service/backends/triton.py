"""NVIDIA Triton Inference Server over gRPC (``tritonclient.grpc.aio``): the production path.

One shared channel per gateway; each call carries its own deadline. Triton's errors are
translated here and nowhere else: server down or model not ready -> Unavailable, deadline
-> DeadlineExceeded, anything else (bad tensor, model crash) -> BackendError (INTERNAL with a
generic message to the client; the detail goes to the log under the request id).
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from service.core import errors

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 2.0
# Status strings tritonclient puts on InferenceServerException (str(grpc.StatusCode)).
_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED")
_DEADLINE = ("StatusCode.DEADLINE_EXCEEDED",)


@contextlib.contextmanager
def translate_triton_errors(model: str):
    """Map tritonclient/gRPC failures to the gateway's error tree."""
    try:
        yield
    except InferenceServerException as exc:
        status = exc.status() or ""
        text = (exc.message() or "").lower()
        if status in _DEADLINE:
            raise errors.DeadlineExceeded(f"Triton did not answer for model {model!r} in time") from exc
        if status in _UNAVAILABLE or "not ready" in text or "unknown model" in text or "unavailable" in text:
            raise errors.Unavailable(f"Triton cannot serve model {model!r} right now; retry later") from exc
        log.warning("Triton error for %s: status %s: %s", model, status, exc.message())
        raise errors.BackendError(f"Triton failed on {model}") from exc


class TritonBackend:
    name = "triton"
    retry_start = True  # Triton may come up after the gateway (Kubernetes): keep trying

    def __init__(self, url: str, timeout_s: float = 30.0) -> None:
        self._url = url
        self._timeout = timeout_s
        self._client = triton.InferenceServerClient(url=url)
        self._models: list[str] = []

    async def start(self, models: list[str]) -> None:
        self._models = list(models)
        for model in self._models:
            with translate_triton_errors(model):
                ready = await self._client.is_model_ready(model, client_timeout=READY_TIMEOUT_S)
            if not ready:
                raise errors.Unavailable(f"Triton at {self._url} does not have model {model!r} ready")

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        request = []
        for name, array in inputs.items():
            tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(np.ascontiguousarray(array))
            request.append(tensor)
        wanted = [triton.InferRequestedOutput(name) for name in outputs]
        with translate_triton_errors(model):
            result = await self._client.infer(model, request, outputs=wanted,
                                              client_timeout=timeout or self._timeout)
        out = {name: result.as_numpy(name) for name in outputs}
        missing = [name for name, value in out.items() if value is None or value.size == 0]
        if missing:
            raise errors.BackendError(f"Triton returned no data for {model} outputs {missing}")
        return out

    async def ready(self) -> bool:
        try:
            if not await self._client.is_server_ready(client_timeout=READY_TIMEOUT_S):
                return False
            for model in self._models:
                if not await self._client.is_model_ready(model, client_timeout=READY_TIMEOUT_S):
                    return False
        except InferenceServerException:
            return False
        return True

    async def close(self) -> None:
        await self._client.close()
