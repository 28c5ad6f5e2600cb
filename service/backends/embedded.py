"""ONNX Runtime sessions inside the gateway process (the default on a laptop or CPU node)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort

from service import errors
from service.model_config import RepositoryEntry, read_entry

log = logging.getLogger(__name__)


class EmbeddedBackend:
    name = "embedded"
    retry_start = False  # a missing or corrupt model file will not fix itself

    def __init__(self, repository: Path, threads: int = 0, workers: int = 2) -> None:
        self._repository = Path(repository)
        self._threads = threads
        self._sessions: dict[str, ort.InferenceSession] = {}
        self._entries: dict[str, RepositoryEntry] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ort")

    def _load(self, model: str) -> None:
        folder = self._repository / model
        if not (folder / "config.pbtxt").is_file():
            raise errors.Unavailable(f"model {model!r} has no config.pbtxt in {self._repository}")
        entry = read_entry(folder)
        path = entry.onnx_path()
        if not path.is_file():
            raise errors.Unavailable(f"model file {path} is missing; run `python -m export` first")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # --ort-threads wins; else the model's own hint in config.pbtxt (the same parameter the
        # Triton python-backend model.py reads); else ONNX Runtime's default (all cores).
        threads = self._threads or int(entry.parameters.get("ort_intra_op_threads", "0") or 0)
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # corrupt or incompatible file
            raise errors.Unavailable(f"model file {path} cannot be loaded by ONNX Runtime: {exc}") from exc
        served = {i.name for i in session.get_inputs()}
        if served != set(entry.input_names):
            raise errors.Unavailable(f"{path}: inputs {sorted(served)} differ from config.pbtxt {entry.input_names}")
        self._sessions[model], self._entries[model] = session, entry

    async def start(self, models: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for model in models:
            await loop.run_in_executor(self._pool, self._load, model)
            log.info("loaded %s on ONNX Runtime", model)

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        session = self._sessions.get(model)
        if session is None:
            raise errors.Unavailable(f"model {model!r} is not loaded")
        loop = asyncio.get_running_loop()
        try:
            results = await asyncio.wait_for(
                loop.run_in_executor(self._pool, session.run, outputs, inputs), timeout)
        except TimeoutError as exc:
            raise errors.DeadlineExceeded(f"model {model!r} did not answer within {timeout:.1f} s") from exc
        except Exception as exc:  # ORT raises its own exception types for bad tensors
            raise errors.BackendError(f"{model}: {type(exc).__name__}") from exc
        return dict(zip(outputs, results))

    async def ready(self) -> bool:
        return bool(self._sessions)

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._sessions.clear()
