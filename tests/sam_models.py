"""A small random SAM (the real ``segment_anything`` classes at reduced depth and width,
``export.sam.VARIANTS["vit_tiny"]``) exported by the real CLI into a model repository, beside
the real LiteMedSAM entries: what the tests of the SAM checkpoint path serve. No weights are
downloaded; the checkpoint is written from a seeded random initialisation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.harness import MODEL_REPOSITORY, REPO

TINY = "sam_vit_tiny"


def tiny_checkpoint(folder: Path, seed: int = 0) -> Path:
    from export.sam import random_checkpoint

    return random_checkpoint("vit_tiny", Path(folder) / f"sam_vit_tiny_seed{seed}.pth", seed=seed)


def export_cli(*args: str, timeout: float = 600.0) -> subprocess.CompletedProcess:
    """``python -m export ARGS`` as a person runs it (exit code and output captured)."""
    return subprocess.run([sys.executable, "-m", "export", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def tiny_sam_repository(folder: Path, with_lite: bool = True, check_cases: int = 2) -> tuple[Path, Path, str]:
    """(repository, checkpoint, export output): the tiny SAM exported by ``python -m export sam``
    (its PyTorch parity check on ``check_cases`` images included) and, with ``with_lite``, the
    LiteMedSAM entries of the main repository linked beside it."""
    folder = Path(folder)
    repository = folder / "repository"
    repository.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_checkpoint(folder)
    out = export_cli("sam", "--checkpoint", str(checkpoint), "--variant", "vit_tiny", "--repository",
                     str(repository), "--check-cases", str(check_cases))
    if out.returncode != 0:
        raise RuntimeError(f"python -m export sam failed ({out.returncode}): {out.stderr[-2000:]}")
    if with_lite:
        for name in ("medsam_lite_encoder", "medsam_lite_decoder"):
            (repository / name).symlink_to(MODEL_REPOSITORY / name, target_is_directory=True)
    return repository, checkpoint, out.stdout + out.stderr
