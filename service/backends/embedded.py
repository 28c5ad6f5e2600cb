"""Models run inside the gateway process (the default on a laptop or CPU node): ONNX Runtime,
or OpenVINO where a model's config.pbtxt asks for it (service/backends/runtimes.py)."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.core import errors
from service.backends.runtimes import ModelSession, open_session, runtime_of
from service.backends.repository import RepositoryEntry, read_entry

log = logging.getLogger(__name__)
LABELS = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}


class EmbeddedBackend:
    name = "embedded"
    retry_start = False  # a missing or corrupt model file will not fix itself

    def __init__(self, repository: Path, threads: int = 0, workers: int = 2) -> None:
        self._repository = Path(repository)
        self._threads = threads
        self._sessions: dict[str, ModelSession] = {}
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
        try:
            session = open_session(path, entry.parameters, self._threads, batch_axis=entry.max_batch_size > 0)
        except ValueError as exc:  # an unknown runtime or precision in config.pbtxt
            raise errors.Unavailable(f"{folder / 'config.pbtxt'}: {exc}") from exc
        except ImportError as exc:
            raise errors.Unavailable(f"model {model!r} needs a runtime that is not installed: {exc}") from exc
        except Exception as exc:  # corrupt or incompatible file
            runtime = LABELS[runtime_of(entry.parameters)]
            raise errors.Unavailable(f"model file {path} cannot be loaded by {runtime}: {exc}") from exc
        served = set(session.input_names)
        if served != set(entry.input_names):
            raise errors.Unavailable(f"{path}: inputs {sorted(served)} differ from config.pbtxt {entry.input_names}")
        self._sessions[model], self._entries[model] = session, entry

    async def start(self, models: list[str]) -> None:
        loop = asyncio.get_running_loop()
        for model in models:
            await loop.run_in_executor(self._pool, self._load, model)
            log.info("loaded %s on %s", model, LABELS[runtime_of(self._entries[model].parameters)])

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
