"""Decode coverage of the gateway's DICOM decoder on pydicom's own test corpus, before/after.

The corpus: every regular file under the installed pydicom package's ``data/test_files``
folder (globbed recursively: ``pydicom.data.get_testdata_files()`` would try to download the
rest of pydicom's test data, and retries forever offline). It holds DICOM of many transfer
syntaxes, photometric interpretations and bit depths, non-image objects (SR, RT Plan,
DICOMDIR, waveforms), deliberately broken files, and non-DICOM helper files (README, JSON,
an ICC profile, a gzip).

For each file:

* after (the gateway): ``service.core.imageio.decode_image(ImageInput(encoded=bytes))``, the
  default frame (the middle one of a multi-frame file), and frame 0 of a multi-frame file.
  Outcome: decoded (output shape), refused with a client error (InvalidImage ->
  INVALID_ARGUMENT, PayloadTooLarge -> RESOURCE_EXHAUSTED; the message is what the client
  gets, grouped into a reason), or any other exception: a bug, listed first and failing the run;
* before (a naive gateway): ``pydicom.dcmread(path).pixel_array`` in a try/except: decoded,
  or the exception a naive gateway would have turned into INTERNAL.

Each refusal message is checked not to hold the file's patient/study tag values. Output:
``docs/DICOM_COVERAGE.md`` and ``bench/dicom_coverage.json``::

    .venv/bin/python bench/dicom_coverage.py

Exit status 1 when any file raised something other than InvalidImage/PayloadTooLarge, or a
message held a patient tag value.
"""

from __future__ import annotations

import collections
import datetime as dt
import io
import json
import re
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402

from bench.measure import machine  # noqa: E402
from service.core.domain import ImageInput  # noqa: E402
from service.core.errors import InvalidImage, PayloadTooLarge  # noqa: E402
from service.core.imageio import UNRECOGNISED, decode_image  # noqa: E402

CORPUS = Path(pydicom.__file__).parent / "data" / "test_files"
COMMAND = ".venv/bin/python bench/dicom_coverage.py"
PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "pyjpegls", "pillow",
            "numpy")
# patient/study attributes whose values must never appear in a message
PRIVATE = ("PatientName", "PatientID", "PatientBirthDate", "StudyDescription", "SeriesDescription",
           "InstitutionName", "ReferringPhysicianName", "AccessionNumber", "StudyID")
# (reason, pattern on the client message), first match wins
REASONS = (
    ("not DICOM Part 10", re.escape(UNRECOGNISED) + "|gzip data is not a NIfTI"),
    ("non-image SOP class", r"holds no image"),
    ("no Pixel Data", r"has no Pixel Data element"),
    ("float pixel data", r"Float Pixel Data"),
    ("transfer syntax without decoder", r"transfer syntax .* is not supported"),
    ("file meta incomplete", r"file meta information has no|file meta information is truncated"),
    ("missing pixel attributes", r"DICOM image has no "),
    ("unsupported photometric", r"PhotometricInterpretation|PALETTE COLOR|palette colour"),
    ("unsupported bit depth", r"bit depth|BitsAllocated|BitsStored"),
    ("malformed attribute", r"is not a single number|is invalid"),
    ("truncated / corrupt", r"truncated|corrupt|larger than the data set declares|holds \d+ bytes"),
)
# Why a corpus file is refused, and whether it should decode: checked against pydicom's own
# tests and the files' headers. Files not named here have no note.
NOTES = {
    "JPEG-lossy.dcm": "a JPEG Extended stream whose scan header breaks the sequential-mode rule (libjpeg: 'scan "
                      "start must be zero and scan stop must be 63'); plain pydicom with the installed plugins "
                      "fails too. JPGExtended.dcm (same size, a valid stream) decodes. Correct refusal.",
    "JPEG2000-embedded-sequence-delimiter.dcm": "the bytes of a Sequence Delimiter (FFFE,E0DD) sit inside the "
                                                "frame's JPEG 2000 SIZ marker (a test of pydicom's parser, not a "
                                                "decodable image), so the width reads 3722445056; JPEG2000.dcm "
                                                "without them decodes. Plain pydicom fails too. Correct refusal.",
    "SC_rgb_rle_32bit.dcm": "32 bits per RGB sample (uint32): scaled by 1 / (2**BitsStored - 1) as every RGB "
                            "depth (refused before 2026-12-01, when the scale stopped at 16 bits).",
    "SC_rgb_rle_32bit_2frame.dcm": "as SC_rgb_rle_32bit.dcm, 2 frames.",
    "MR_truncated.dcm": "Pixel Data cut short (8130 of 8192 bytes). Correct refusal.",
    "badVR.dcm": "NumberOfFrames is '1A' (not a number). Correct refusal.",
    "meta_missing_tsyntax.dcm": "file meta without a Transfer Syntax UID, and no pixel attributes. Correct refusal.",
    "nested_priv_SQ.dcm": "Pixel Data without any pixel attributes (no Photometric Interpretation, Rows, "
                          "BitsAllocated). Correct refusal.",
    "ExplVR_BigEndNoMeta.dcm": "a bare data set (no preamble, no 'DICM', no file meta) and no Pixel Data.",
    "ExplVR_LitEndNoMeta.dcm": "a bare data set (no preamble, no 'DICM', no file meta) and no Pixel Data.",
    "no_meta.dcm": "a bare data set (no preamble, no file meta) after one stray byte: not Part 10. A client must "
                   "send DICOM Part 10 files; plain pydicom refuses it without force=True too.",
    "rtstruct.dcm": "an RT Structure Set as a bare data set (no Part 10 header); no image in it either.",
    "zipMR.gz": "MR_small.dcm gzipped as a whole file (not a DICOM encoding; the Deflated transfer syntax is "
                "the standard one, and decodes); the gateway sniffs gzip as NIfTI (.nii.gz), hence the message.",
    "examples_palette.dcm": "PALETTE COLOR: decoded to RGB through its Palette Color LUTs (refused before this "
                            "change).",
}


def _syntax(prefix: str):
    return lambda h: (h.get("transfer_syntax") or "").startswith(prefix)


def _photometric(prefix: str):
    return lambda h: (h.get("PhotometricInterpretation") or "").startswith(prefix)


# The issue's list of what must decode, as predicates on a file's header (image files only:
# those with a PhotometricInterpretation)
ISSUE_LIST = (
    ("JPEG baseline", _syntax("JPEG Baseline")),
    ("JPEG extended", _syntax("JPEG Extended")),
    ("JPEG lossless (Process 14, SV1)", _syntax("JPEG Lossless")),
    ("JPEG-LS (lossless, near-lossless)", _syntax("JPEG-LS")),
    ("JPEG 2000 (lossless, lossy)", _syntax("JPEG 2000")),
    ("HTJ2K", _syntax("High-Throughput")),
    ("RLE Lossless", _syntax("RLE Lossless")),
    ("deflated", _syntax("Deflated")),
    ("big endian", _syntax("Explicit VR Big Endian")),
    ("little endian, implicit VR", _syntax("Implicit VR Little Endian")),
    ("little endian, explicit VR", _syntax("Explicit VR Little Endian")),
    ("multi-frame", lambda h: str(h.get("NumberOfFrames") or "1").isdigit() and int(h.get("NumberOfFrames") or 1) > 1),
    ("MONOCHROME1", _photometric("MONOCHROME1")),
    ("MONOCHROME2", _photometric("MONOCHROME2")),
    ("RGB", _photometric("RGB")),
    ("YBR (FULL, FULL_422, RCT, ICT, PARTIAL)", _photometric("YBR")),
    ("PALETTE COLOR (-> RGB)", _photometric("PALETTE COLOR")),
)


def corpus_files(root: Path = CORPUS) -> list[Path]:
    """Every regular file under ``root``, recursively, sorted by relative path."""
    return sorted((p for p in root.rglob("*") if p.is_file() and not p.is_symlink()),
                  key=lambda p: p.relative_to(root).as_posix())


def _bare_dataset(data: bytes) -> bool:
    """A DICOM data set without the Part 10 header (no 128-byte preamble + 'DICM')."""
    vrs = rb"(?:AE|AS|CS|DA|DS|DT|IS|LO|PN|SH|SQ|TM|UI|UL|US)"
    if re.search(rb"\x08\x00.\x00" + vrs + rb"|\x00\x08\x00." + vrs, data[:512], re.DOTALL):
        return True
    try:
        return "SOPClassUID" in pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - anything unreadable is not a data set
        return False


def header(data: bytes) -> dict:
    """The technical attributes of a Part 10 file (no patient data); {} when unreadable."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        return {}
    syntax = ds.file_meta.get("TransferSyntaxUID")
    sop = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "")))
    out = {
        "transfer_syntax": (syntax.name if syntax.is_transfer_syntax else "unknown") if syntax else "(none)",
        "sop_class": sop.name if sop and sop.keyword else ("(none)" if not sop else "unknown"),
    }
    for key in ("PhotometricInterpretation", "SamplesPerPixel", "BitsAllocated", "BitsStored", "NumberOfFrames",
                "Rows", "Columns"):
        value = ds.get(key)
        out[key] = None if value is None or value == "" else str(value).strip()
    out["_private"] = [str(ds.get(key)) for key in PRIVATE if len(str(ds.get(key) or "").strip()) >= 3]
    return out


def gateway(data: bytes, slice_index: int | None = None) -> dict:
    """The gateway's outcome: decoded / refused (status, message, reason) / bug."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = decode_image(ImageInput(encoded=data, slice_index=slice_index))
    except (InvalidImage, PayloadTooLarge) as exc:
        status = "INVALID_ARGUMENT" if isinstance(exc, InvalidImage) else "RESOURCE_EXHAUSTED"
        reason = next((name for name, pattern in REASONS if re.search(pattern, exc.message)), "other")
        if status == "RESOURCE_EXHAUSTED":
            reason = "over the size limits"
        if reason == "not DICOM Part 10":
            reason = "DICOM data set without Part 10 header" if _bare_dataset(data) else "not DICOM at all"
        return {"outcome": "refused", "status": status, "reason": reason, "message": exc.message}
    except BaseException as exc:  # noqa: BLE001 - a bug: reported
        if isinstance(exc, KeyboardInterrupt):
            raise
        return {"outcome": "bug", "exception": type(exc).__name__, "message": str(exc)[:300]}
    pixels = image.pixels
    ok = (pixels.dtype.name == "float32" and pixels.ndim in (2, 3) and bool((pixels >= 0).all())
          and bool((pixels <= 1).all()))
    if not ok:
        return {"outcome": "bug", "exception": "output contract", "message": f"{pixels.dtype} {pixels.shape}"}
    return {"outcome": "decoded", "shape": list(pixels.shape)}


def naive(data: bytes) -> dict:
    """What plain ``pydicom.dcmread(...).pixel_array`` gives (a naive gateway)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            array = pydicom.dcmread(io.BytesIO(data)).pixel_array
    except Exception as exc:  # noqa: BLE001 - what the naive gateway would turn into INTERNAL
        return {"outcome": "exception", "exception": type(exc).__name__,
                "message": (str(exc).strip().splitlines() or [""])[0][:160]}
    return {"outcome": "decoded", "shape": list(array.shape), "dtype": array.dtype.name}


def classify(path: Path, root: Path = CORPUS) -> dict:
    """Before/after of one corpus file (after: the default frame and, multi-frame, frame 0)."""
    data = path.read_bytes()
    head = header(data) if data[128:132] == b"DICM" else {}
    private = head.pop("_private", [])
    row = {"file": path.relative_to(root).as_posix(), "bytes": len(data), "header": head,
           "before": naive(data), "after": gateway(data)}
    frames = int(head.get("NumberOfFrames") or 1) if str(head.get("NumberOfFrames") or "1").isdigit() else 1
    if frames > 1:
        row["after_frame0"] = gateway(data, 0)
    names = [head.get("sop_class") or "", head.get("transfer_syntax") or ""]  # registered names, not tag values
    messages = [row[k].get("message", "") for k in ("after", "after_frame0") if k in row]
    for name in filter(None, names):
        messages = [m.replace(name, "") for m in messages]
    row["leaks"] = sorted({value for value in private for m in messages if value in m})
    return row


# --------------------------------------------------------------------------- report
def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def summarise(rows: list[dict]) -> dict:
    before = collections.Counter(r["before"]["outcome"] for r in rows)
    after = collections.Counter(r["after"]["outcome"] for r in rows)
    statuses = collections.Counter(r["after"]["status"] for r in rows if r["after"]["outcome"] == "refused")
    reasons = collections.Counter(r["after"]["reason"] for r in rows if r["after"]["outcome"] == "refused")
    syntaxes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for r in rows:
        if r["header"]:
            counts = syntaxes[r["header"]["transfer_syntax"]]
            counts["files"] += 1
            counts[r["after"]["outcome"]] += 1
            counts["before_decoded"] += r["before"]["outcome"] == "decoded"
    cross = collections.Counter(f"{r['before']['outcome']} -> {r['after']['outcome']}" for r in rows)
    exceptions = collections.Counter(r["before"]["exception"] for r in rows if r["before"]["outcome"] == "exception")
    bugs = [r for r in rows if r["after"]["outcome"] == "bug" or r.get("after_frame0", {}).get("outcome") == "bug"]
    images = [r for r in rows if r["header"].get("PhotometricInterpretation")]
    issue = {}
    for label, wanted in ISSUE_LIST:
        match = [r for r in images if wanted(r["header"])]
        issue[label] = {"image_files": len(match),
                        "decoded": sum(r["after"]["outcome"] == "decoded" for r in match),
                        "refused": {r["file"]: r["after"].get("reason", r["after"]["outcome"])
                                    for r in match if r["after"]["outcome"] != "decoded"}}
    return {"files": len(rows), "before": dict(before), "after": dict(after), "after_statuses": dict(statuses),
            "after_reasons": dict(reasons.most_common()), "before_exceptions": dict(exceptions.most_common()),
            "before_to_after": dict(cross), "by_transfer_syntax": {k: dict(v) for k, v in sorted(syntaxes.items())},
            "issue_list": issue, "bugs": [r["file"] for r in bugs], "leaks": [r["file"] for r in rows if r["leaks"]]}


def markdown(result: dict) -> str:
    s, rows = result["summary"], result["files"]
    lines = [
        "# DICOM decode coverage: pydicom's test corpus",
        "",
        f"- Machine: {result['machine']}",
        f"- Date: {result['date']}",
        f"- Command: `{result['command']}` (writes this file and `bench/dicom_coverage.json`)",
        f"- Corpus: every regular file under `{result['corpus']}` ({s['files']} files, recursive glob; "
        "`pydicom.data.get_testdata_files()` is not used: it downloads)",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        f"- Run time: {result['seconds']} s",
        "",
        "**Before**: a naive gateway, `pydicom.dcmread(f).pixel_array` in a try/except (pydicom picks whichever "
        "installed plugin decodes; every exception would reach the client as INTERNAL). **After**: "
        "`service.core.imageio.decode_image(ImageInput(encoded=bytes))`, the default (middle) frame, and frame 0 "
        "of multi-frame files; a refusal is `InvalidImage` (INVALID_ARGUMENT) or `PayloadTooLarge` "
        "(RESOURCE_EXHAUSTED) with the message shown. Any other exception is a bug.",
        "",
    ]
    if s["bugs"]:
        lines += ["## BUGS: exceptions other than InvalidImage/PayloadTooLarge", ""]
        for r in rows:
            if r["file"] in s["bugs"]:
                for key in ("after", "after_frame0"):
                    if r.get(key, {}).get("outcome") == "bug":
                        lines.append(f"- `{r['file']}` ({key}): {r[key]['exception']}: {_cell(r[key]['message'])}")
        lines.append("")
    else:
        lines += ["**Bugs (any other exception, or an image outside the output contract): none.** "
                  f"Messages holding a patient/study tag value of their file: {len(s['leaks'])}.", ""]
    refused = s["after"].get("refused", 0)
    lines += [
        "## Outcomes",
        "",
        "| outcome | before (plain pydicom) | after (gateway) |",
        "|---|---:|---:|",
        f"| decoded | {s['before'].get('decoded', 0)} | {s['after'].get('decoded', 0)} |",
        f"| refused with a client error (INVALID_ARGUMENT / RESOURCE_EXHAUSTED) | 0 | {refused} "
        f"({s['after_statuses'].get('INVALID_ARGUMENT', 0)} / {s['after_statuses'].get('RESOURCE_EXHAUSTED', 0)}) |",
        f"| another exception (INTERNAL to the client) | {s['before'].get('exception', 0)} | "
        f"{s['after'].get('bug', 0)} |",
        f"| **files** | {s['files']} | {s['files']} |",
        "",
        "Before, the exceptions: " + ", ".join(f"{k} {v}" for k, v in s["before_exceptions"].items()) + ".",
        "",
        "Before -> after: " + ", ".join(f"{k}: {v}" for k, v in sorted(s["before_to_after"].items())) + ".",
        "",
        "## Refusals by reason (after)",
        "",
        "| reason | files |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v} |" for k, v in s["after_reasons"].items()]
    lines += ["", "## The issue's list, on this corpus's image files", "",
              "Image files: Part 10 files with a PhotometricInterpretation; a file counts in every row it fits.", "",
              "| must decode | image files | decoded | refused (file: reason) |", "|---|---:|---:|---|"]
    for label, c in s["issue_list"].items():
        refused = "; ".join(f"`{f}`: {why}" for f, why in c["refused"].items())
        lines.append(f"| {label} | {c['image_files']} | {c['decoded']} | "
                     f"{refused or ('none' if c['image_files'] else 'not in this corpus')} |")
    lines += ["", "## By transfer syntax (Part 10 files whose header reads)", "",
              "| transfer syntax | files | decoded (after) | refused (after) | decoded (before) |",
              "|---|---:|---:|---:|---:|"]
    for name, c in s["by_transfer_syntax"].items():
        lines.append(f"| {_cell(name)} | {c['files']} | {c.get('decoded', 0)} | {c.get('refused', 0)} | "
                     f"{c.get('before_decoded', 0)} |")
    lines += ["", "## Refused files", "",
              "| file | reason | message the client gets | plain pydicom | note |", "|---|---|---|---|---|"]
    for r in rows:
        a = r["after"]
        if a["outcome"] != "refused":
            continue
        b = r["before"]
        before = (f"decoded {tuple(b['shape'])} {b['dtype']}" if b["outcome"] == "decoded" else b["exception"])
        lines.append(f"| `{r['file']}` | {a['reason']} | {a['status']}: {_cell(a['message'])} | {before} | "
                     f"{_cell(NOTES.get(r['file'], ''))} |")
    lines += ["", "## Decoded files", "",
              "| file | transfer syntax | photometric | bits (alloc/stored) | frames | shape | frame 0 "
              "| plain pydicom |",
              "|---|---|---|---|---:|---|---|---|"]
    for r in rows:
        if r["after"]["outcome"] != "decoded":
            continue
        h, b = r["header"], r["before"]
        frame0 = r.get("after_frame0")
        f0 = "" if frame0 is None else (str(tuple(frame0["shape"])) if frame0["outcome"] == "decoded"
                                        else frame0["outcome"])
        before = f"decoded {b['dtype']}" if b["outcome"] == "decoded" else b["exception"]
        lines.append(f"| `{r['file']}` | {_cell(h.get('transfer_syntax'))} | "
                     f"{_cell(h.get('PhotometricInterpretation'))} | {h.get('BitsAllocated')}/{h.get('BitsStored')} | "
                     f"{h.get('NumberOfFrames') or 1} | {tuple(r['after']['shape'])} | {f0} | {before} |")
    lines += ["", "## What remains refused, and why", ""]
    lines += [f"- {item}" for item in result["remaining"]]
    return "\n".join(lines) + "\n"


REMAINING = [
    "**Should decode, does not (gaps)**: none on this corpus (32-bit RGB, `SC_rgb_rle_32bit*.dcm`, decodes since "
    "the RGB scale takes 1..32 bits).",
    "**Not Part 10**: bare data sets without preamble/'DICM'/file meta (`*NoMeta.dcm`, `no_meta.dcm`, "
    "`rtstruct.dcm`) and a gzipped DICOM file (`zipMR.gz`) are refused as unrecognised: the gateway's contract is "
    "DICOM Part 10 files, which is what PACS and DICOMweb send; plain pydicom refuses them too without "
    "`force=True`. Of these only `no_meta.dcm` (a CT data set after a stray leading byte) and `zipMR.gz` "
    "(MR_small.dcm gzipped whole) hold an image. Possible improvement: say 'gzip-compressed DICOM is not "
    "accepted; send the file itself' when the inflated head is DICOM (today: 'gzip data is not a NIfTI-1 "
    "(.nii.gz) image').",
    "**No image to decode (correct refusals)**: DICOMDIRs, SR, RT Plan and an ECG waveform (non-image SOP "
    "classes, named in the message), and image SOP classes stored without Pixel Data (the TINY_ALPHA series of "
    "DICOMDIR test stubs, `UN_sequence.dcm`, `priv_SQ.dcm`, `no_meta_group_length.dcm`, "
    "`empty_charset_LEI.dcm`).",
    "**Broken files (correct refusals)**: `MR_truncated.dcm` (short Pixel Data), `badVR.dcm` (NumberOfFrames "
    "'1A'), `meta_missing_tsyntax.dcm`, `nested_priv_SQ.dcm` (Pixel Data without pixel attributes), "
    "`JPEG-lossy.dcm` (an invalid JPEG Extended scan header) and `JPEG2000-embedded-sequence-delimiter.dcm` "
    "(delimiter bytes inside the J2K SIZ marker); plain pydicom fails on both too.",
    "**Not in this corpus** (pydicom ships only part of its test data; the rest, e.g. OBXXXX1A.dcm, "
    "`pydicom-data`, is downloaded): segmented palettes, JPEG Lossless Process 14 (non-SV1), HTJ2K, Float "
    "Pixel Data (parametric maps, refused by a named message). tests/unit/test_imageio.py covers segmented "
    "palettes and multi-frame RLE/JPEG-LS/J2K/deflated synthetically; HTJ2K and the Float Pixel Data refusal "
    "have no test yet.",
]


def main() -> int:
    started = time.perf_counter()
    files = corpus_files()
    rows = [classify(path) for path in files]
    summary = summarise(rows)
    result = {
        "machine": machine(), "date": dt.datetime.now().isoformat(timespec="seconds"), "command": COMMAND,
        "corpus": "<site-packages>/pydicom/data/test_files", "versions": _versions(),
        "seconds": round(time.perf_counter() - started, 1), "summary": summary, "remaining": REMAINING, "files": rows,
    }
    (REPO / "bench" / "dicom_coverage.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (REPO / "docs" / "DICOM_COVERAGE.md").write_text(markdown(result), encoding="utf-8")
    print(json.dumps({k: summary[k] for k in ("files", "before", "after", "after_reasons", "bugs", "leaks")},
                     indent=2))
    return 1 if summary["bugs"] or summary["leaks"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
