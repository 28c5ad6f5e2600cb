"""What the export writes into model_repository/ is not tracked by git, except the fp32
LiteMedSAM configs the repository ships: a variant's config committed by mistake is in every
clone, so a clone whose guard refuses the variant (a bare clone) would find a config without
its model file, and every `make models` would leave the checkout dirty."""

import shutil
import subprocess

import pytest

from bench.harness import MODEL_REPOSITORY, REPO
from export.encoder_variants import VARIANTS, variant_entries
from export.medsam_lite import medsam_lite_entries

pytestmark = pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(),
                                reason="not a git checkout")


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def test_only_the_fp32_litemedsam_configs_are_tracked():
    tracked = set(_git("ls-files", "model_repository").stdout.split())
    fp32 = {f"model_repository/{e.name}/config.pbtxt" for e in medsam_lite_entries()}
    assert tracked == fp32


def test_every_variant_entry_the_export_writes_is_ignored():
    encoder, decoder = medsam_lite_entries()
    names = [e.name for v in VARIANTS.values() for e in variant_entries(v, encoder, decoder) if e is not None]
    assert len(names) >= 5, names
    for name in names:
        for path in (f"{name}/config.pbtxt", f"{name}/1/model.onnx", f"{name}/1/model.xml"):
            rel = (MODEL_REPOSITORY / path).relative_to(REPO)
            assert _git("check-ignore", "-q", str(rel)).returncode == 0, f"{rel} is not ignored by .gitignore"
