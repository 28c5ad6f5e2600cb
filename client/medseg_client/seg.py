"""How the gateway writes a DICOM Segmentation (SEG): ``medseg.v1.DicomSegOptions`` of the SDK.

A SEG is what the gateway returns for ``segment(..., encoding="dicom_seg")`` on a DICOM image
(one segment per prompt), ``get_segment_mask(..., dicom_seg=True)`` of an uploaded DICOM series
and ``segment_study(...)`` of a series in its PACS (one segment). Every option is optional::

    from medseg_client import Code, DicomSegOptions, SegmentDescription

    options = DicomSegOptions(
        segments=["liver",                                    # a label the gateway codes itself
                  SegmentDescription("lesion 1", category=("SCT", "49755003", "Morphologically Altered Structure"),
                                     type=("SCT", "4147007", "Mass"))],
        kind="binary",                                        # or "labelmap" (segments must not overlap)
        series_description="liver and lesion (AI)",
    )

A segment is a :class:`SegmentDescription`, a label (``str``) or a ``pb.SegmentDescription``; a
code is a :class:`Code`, a ``(scheme_designator, value, meaning)`` tuple or a ``pb.Code``. Without
codes the gateway codes a label it knows in SNOMED CT, else as the generic "Tissue": the label
still says what it is. Checks here are those the DICOM value representations impose (a label and
a series description are at most 64 characters, no backslash or control character); the gateway
checks the rest (INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client.wire import SEG_KIND_TO_PB, SEG_KINDS

__all__ = ["Code", "DicomSegOptions", "SegmentDescription", "dicom_seg_message"]

MAX_LO_CHARS = 64  # DICOM LO (SegmentLabel, SeriesDescription, CodeMeaning)


@dataclass(frozen=True)
class Code:
    """A coded concept (a DICOM Code Sequence item), e.g. ``Code("SCT", "10200004", "Liver")``."""

    scheme_designator: str
    value: str
    meaning: str


CodeLike = Code | tuple[str, str, str] | pb.Code


@dataclass(frozen=True)
class SegmentDescription:
    """What one segment is: its ``label`` (empty: "segment N") and, optionally, its Segmented
    Property Category and Type (both or neither) and a type modifier (only with both)."""

    label: str = ""
    category: CodeLike | None = None
    type: CodeLike | None = None
    type_modifier: CodeLike | None = None


SegmentLike = SegmentDescription | str | pb.SegmentDescription


@dataclass(frozen=True)
class DicomSegOptions:
    """How to write the SEG: ``segments`` in order (2-D: one per prompt; volumes: one; fewer: the
    rest get "segment N" and the generic codes), ``kind`` ``"binary"`` (1 bit per pixel, segments
    may overlap) or ``"labelmap"`` (Label Map Segmentation, segments must not overlap), and the
    ``series_description`` (empty: the gateway's ``--seg-series-description``)."""

    segments: Sequence[SegmentLike] = ()
    kind: str = "binary"
    series_description: str = ""


def dicom_seg_message(options: DicomSegOptions | pb.DicomSegOptions | None, *,
                      max_segments: int | None = None) -> pb.DicomSegOptions | None:
    """``options`` as a ``pb.DicomSegOptions`` (``None`` stays ``None``); :class:`ValueError` when a
    value cannot be written, or there are more than ``max_segments`` segments."""
    if options is None:
        return None
    if isinstance(options, pb.DicomSegOptions):
        message = pb.DicomSegOptions()
        message.CopyFrom(options)
    elif isinstance(options, DicomSegOptions):
        if options.kind not in SEG_KIND_TO_PB:
            raise ValueError(f"SEG kind must be one of {', '.join(SEG_KIND_TO_PB)}, got {options.kind!r}")
        if isinstance(options.segments, (str, bytes)):
            raise ValueError("segments is a sequence of segments (labels or SegmentDescription), not one string")
        message = pb.DicomSegOptions(segments=[_segment(s, i) for i, s in enumerate(options.segments, 1)],
                                     kind=SEG_KIND_TO_PB[options.kind],
                                     series_description=_text(options.series_description, "series_description"))
    else:
        raise ValueError(f"DICOM SEG options are a DicomSegOptions (or pb.DicomSegOptions), got "
                         f"{type(options).__name__}")
    if message.kind not in SEG_KINDS:
        raise ValueError(f"unknown SEG kind {message.kind}")
    for number, segment in enumerate(message.segments, 1):
        _check_segment(segment, number)
    _text(message.series_description, "series_description")
    if max_segments is not None and len(message.segments) > max_segments:
        raise ValueError(f"{len(message.segments)} segment descriptions for a SEG of {max_segments} "
                         f"segment{'s' if max_segments != 1 else ''}")
    return message


# --------------------------------------------------------------------------- helpers
def _segment(segment: SegmentLike, number: int) -> pb.SegmentDescription:
    if isinstance(segment, pb.SegmentDescription):
        return segment
    if isinstance(segment, str):
        return pb.SegmentDescription(label=segment)
    if not isinstance(segment, SegmentDescription):
        raise ValueError(f"segment {number}: a label (str) or a SegmentDescription, got {type(segment).__name__}")
    message = pb.SegmentDescription(label=segment.label)
    for name in ("category", "type", "type_modifier"):
        value = getattr(segment, name)
        if value is not None:
            getattr(message, name).CopyFrom(_code(value, f"segment {number} {name}"))
    return message


def _code(code: CodeLike, where: str) -> pb.Code:
    if isinstance(code, pb.Code):
        return code
    if isinstance(code, Code):
        return pb.Code(scheme_designator=code.scheme_designator, value=code.value, meaning=code.meaning)
    if isinstance(code, tuple) and len(code) == 3 and all(isinstance(v, str) for v in code):
        return pb.Code(scheme_designator=code[0], value=code[1], meaning=code[2])
    raise ValueError(f"{where}: a code is Code(scheme_designator, value, meaning) or a tuple of those three "
                     f"strings, got {code!r}")


def _check_segment(segment: pb.SegmentDescription, number: int) -> None:
    where = f"segment {number}"  # SEG segment numbers start at 1
    _text(segment.label, f"{where} label")
    if segment.HasField("category") != segment.HasField("type"):
        raise ValueError(f"{where}: give both category and type, or neither (the gateway then codes the label)")
    if segment.HasField("type_modifier") and not segment.HasField("type"):
        raise ValueError(f"{where}: type_modifier goes only with category and type")
    for name in ("category", "type", "type_modifier"):
        if segment.HasField(name):
            code = getattr(segment, name)
            if not (code.scheme_designator.strip() and code.value.strip() and code.meaning.strip()):
                raise ValueError(f"{where} {name}: scheme_designator, value and meaning are all required")
            _text(code.meaning, f"{where} {name} meaning")


def _text(value: str, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > MAX_LO_CHARS:
        raise ValueError(f"{name} is {len(value)} characters; DICOM allows at most {MAX_LO_CHARS}")
    if "\\" in value or any(ord(c) < 32 for c in value):
        raise ValueError(f"{name} may not hold a backslash or a control character")
    return value
