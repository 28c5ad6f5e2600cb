"""Optional dependencies, imported when first needed, with an error that names the extra."""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``; when it is missing raise :class:`ImportError` saying which
    ``medseg-client[extra]`` installs it. ``purpose``: what needs it, e.g. "reading DICOM"."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise ImportError(
            f"{purpose} needs the optional package {top!r}: pip install 'medseg-client[{extra}]'",
            name=top,
        ) from exc
