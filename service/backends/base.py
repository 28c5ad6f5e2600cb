"""The one narrow interface between the gateway and whatever runs the models."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Backend(Protocol):
    """Runs repository models by name.

    ``infer`` takes and returns tensors named as in the model's ``config.pbtxt``; it raises
    :class:`service.core.errors.Unavailable` when the backend cannot serve right now,
    :class:`service.core.errors.DeadlineExceeded` on timeout and
    :class:`service.core.errors.BackendError` for anything else.
    """

    name: str

    async def start(self, models: list[str]) -> None:
        """Load (or check the readiness of) ``models``; raise if they cannot be served."""

    async def infer(self, model: str, inputs: dict[str, np.ndarray], outputs: list[str],
                    timeout: float | None = None) -> dict[str, np.ndarray]:
        ...

    async def ready(self) -> bool:
        ...

    async def close(self) -> None:
        ...
