"""Writer of Triton model-repository entries: ``config.pbtxt`` (rendered by the schema,
:class:`service.backends.repository.RepositoryEntry`) and, for the ``cpu`` target, the
python-backend ``model.py`` with the gateway's runtime module beside it."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from service.backends.repository import RepositoryEntry

PYTHON_MODEL = Path(__file__).with_name("triton_python_model.py")
# The gateway's runtime module, shipped beside model.py so both paths run a model alike.
RUNTIMES_MODULE = Path(__file__).resolve().parents[1] / "service" / "backends" / "runtimes.py"


def write_config(repository: Path, entry: RepositoryEntry, target: str, instances: int = 1,
                 version: int = 1) -> Path:
    """Write ``<repository>/<entry>/config.pbtxt``; for the cpu target also the python-backend
    ``<version>/model.py`` that runs the ONNX file beside it, with ``medseg_runtimes.py``."""
    path = Path(repository) / entry.name / "config.pbtxt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(entry.render(target, instances))
    if target == "cpu":
        version_dir = path.parent / str(version)
        version_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PYTHON_MODEL, version_dir / "model.py")
        shutil.copyfile(RUNTIMES_MODULE, version_dir / "medseg_runtimes.py")
    return path


def placed(entry: RepositoryEntry, repository: Path) -> RepositoryEntry:
    """``entry`` as it will sit in ``repository`` (its folder set, so ``onnx_path()`` works)."""
    return replace(entry, path=Path(repository) / entry.name)
