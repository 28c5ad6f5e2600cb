"""bench/dicom_coverage.py on a handful of pydicom's own test files: each one decodes or is
refused with InvalidImage/PayloadTooLarge (never another exception), and the corpus glob finds
pydicom's bundled files without downloading anything."""

from __future__ import annotations

import pydicom.data
import pytest

from bench import dicom_coverage as cov

# (file, transfer syntax, expected outcome, reason when refused)
CASES = [
    ("MR_small_bigendian.dcm", "Explicit VR Big Endian", "decoded", None),
    ("image_dfl.dcm", "Deflated Explicit VR Little Endian", "decoded", None),
    ("SC_rgb_rle_2frame.dcm", "RLE Lossless", "decoded", None),  # multi-frame: middle frame and frame 0
    ("SC_rgb_rle_32bit.dcm", "RLE Lossless", "decoded", None),   # 32 bits per RGB sample
    ("SC_rgb_jpeg_dcmtk.dcm", "JPEG Baseline (Process 1)", "decoded", None),
    ("SC_rgb_jpeg_gdcm.dcm", "JPEG Lossless, Non-Hierarchical, First-Order Prediction", "decoded", None),
    ("MR_small_jpeg_ls_lossless.dcm", "JPEG-LS Lossless Image Compression", "decoded", None),
    ("MR_small_jp2klossless.dcm", "JPEG 2000 Image Compression (Lossless Only)", "decoded", None),
    ("examples_palette.dcm", "Explicit VR Little Endian", "decoded", None),  # PALETTE COLOR -> RGB
    ("JPEG-lossy.dcm", "JPEG Extended (Process 2 and 4)", "refused", "truncated / corrupt"),
    ("rtplan.dcm", "Implicit VR Little Endian", "refused", "non-image SOP class"),
]


def test_corpus_glob_finds_pydicoms_bundled_files_without_downloading(monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("get_testdata_files downloads; the corpus must be globbed")

    monkeypatch.setattr(pydicom.data, "get_testdata_files", no_download)
    files = cov.corpus_files()
    assert len(files) > 50
    assert all(path.is_file() for path in files)
    names = {path.relative_to(cov.CORPUS).as_posix() for path in files}
    assert {name for name, *_ in CASES} <= names
    assert any("/" in name for name in names)  # recursive: dicomdirtests/...


@pytest.mark.parametrize(("name", "syntax", "outcome", "reason"), CASES, ids=[c[0] for c in CASES])
def test_corpus_file_decodes_or_gets_a_client_error(name, syntax, outcome, reason):
    row = cov.classify(cov.CORPUS / name)
    assert row["header"]["transfer_syntax"].startswith(syntax), row["header"]
    results = [row["after"]] + ([row["after_frame0"]] if "after_frame0" in row else [])
    for after in results:
        assert after["outcome"] in ("decoded", "refused"), after  # "bug": another exception
        assert after["outcome"] == outcome, after
        if after["outcome"] == "refused":
            assert after["status"] in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")
            assert after["reason"] == reason, after
        else:
            assert len(after["shape"]) in (2, 3)
    assert row["leaks"] == []
    if name == "SC_rgb_rle_2frame.dcm":
        assert "after_frame0" in row
    if name == "examples_palette.dcm":
        assert row["after"]["shape"][-1] == 3 and row["before"]["outcome"] == "decoded"


def test_refusal_reasons_of_non_dicom_and_bare_data_sets():
    assert cov.gateway(b"plain text, not an image" * 20)["reason"] == "not DICOM at all"
    bare = (cov.CORPUS / "ExplVR_LitEndNoMeta.dcm").read_bytes()
    assert cov.gateway(bare)["reason"] == "DICOM data set without Part 10 header"
