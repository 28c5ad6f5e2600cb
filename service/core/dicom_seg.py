"""DICOM Segmentation objects (SEG) of the gateway's masks, written with highdicom (no gRPC).

:func:`write_seg` turns masks on the source instances of a DICOM series (or one 2-D DICOM
image) into one DICOM SEG instance, as Part 10 bytes:

* **Source.** ``source_datasets`` are the headers of the source instances (no Pixel Data
  needed), in slice order: :meth:`service.core.volume.Volume.dicom_headers` for an uploaded
  series, :func:`service.core.imageio.dicom_header` for one 2-D image. One study, one series,
  one Frame of Reference, single-frame images of one size; a multi-frame source image is
  refused (not supported yet).
* **Masks.** ``masks[k]`` is the mask on ``source_datasets[k]``, in that file's own rows and
  columns (the input convention of a DICOM series; a mask in model orientation goes back
  with :meth:`Volume.mask_to_input`, which :func:`write_volume_seg` does): bool (or 0/1
  integers) ``(rows, columns)`` for one segment, ``(segments, rows, columns)`` for several.
  A slice absent from ``masks`` is empty.
* **Frames.** Only frames that contain a segment are written (highdicom
  ``omit_empty_frames``; slices without any foreground are not even handed to highdicom,
  which is several times faster on a long series and holds only the non-empty slices in
  memory). Every source instance is still referenced (Referenced Series Sequence; each
  frame's Derivation Image / Source Image Sequence names its own source instance), and so
  is the Frame of Reference. A segmentation without any foreground gets one empty frame
  on its first slice (a SEG needs a frame).
* **Segments.** One per :class:`SegmentSpec`, numbered from 1 in the order given, with its
  label as SegmentLabel and coded Segmented Property Category / Type (and Type Modifier,
  e.g. laterality): the caller's own codes, else :data:`STRUCTURES` looked up from the
  label, else the generic fallback category "Tissue" / type "Tissue" (SCT 85756007, CID
  7150 / 7191: a segment of unknown anatomy; the label still says what it is).
* **Algorithm.** Segment Algorithm Type (SEMIAUTOMATIC by default: the gateway's masks come
  from a user's prompts; AUTOMATIC for a prompt-free model) and the Segment Algorithm
  Identification: the model's name, version and family (DCM 123110 "Artificial
  Intelligence", CID 7162, by default).
* **Kind.** ``"binary"`` (Segmentation Storage, 1 bit per pixel; segments may overlap) or
  ``"labelmap"`` (Label Map Segmentation Storage, one 8/16-bit label image per frame,
  segments must not overlap; highdicom adds the background segment 0). LABELMAP needs a
  highdicom with ``SegmentationTypeValues.LABELMAP`` (0.23+; the pinned 0.28.2 has it).
  Note: Debian's dicom3tools (dciodvfy 2022) predates the Label Map Segmentation IOD and
  cannot validate it; BINARY passes it without errors or warnings.
* **Identity.** New Series and SOP Instance UIDs (or the caller's); series description,
  series number, content label/description/creator and the equipment (manufacturer,
  model name, software versions, serial number) are parameters.

**Patient data.** The standard requires the SEG to carry the source's Patient, Study (and
Clinical Trial) modules; highdicom copies them. None of their values is logged or put in an
error message: messages name attributes and instance numbers (1-based, slice order) only,
and while a thread builds a SEG, what the ``highdicom`` and ``pydicom`` loggers log and the
Python warnings shown in that thread are dropped (highdicom warns with the patient's name
when it has a single component; pydicom warns with a value that does not fit its VR). The
switch is per thread: records and warnings of other threads meanwhile are untouched.
"""

from __future__ import annotations

import copy
import io
import logging
import operator
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import highdicom as hd
import numpy as np
import pydicom
from highdicom.seg import SegmentationTypeValues
from pydicom import config as dicom_config
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.valuerep import validate_value

from service import __version__
from service.core.errors import InvalidArgument

if TYPE_CHECKING:  # pragma: no cover
    from service.core.volume import Volume

__all__ = ["ANATOMICAL_STRUCTURE", "DEFAULT_SERIES_NUMBER", "GENERIC_CATEGORY", "GENERIC_TYPE", "KINDS",
           "LABELMAP_SUPPORTED", "STRUCTURES", "Algorithm", "SegOptions", "SegmentCodes", "SegmentSpec", "new_uid", "segment_codes",
           "write_seg", "write_volume_seg"]

CodeLike = Union[Code, hd.sr.CodedConcept]

KINDS = ("binary", "labelmap")
LABELMAP_SUPPORTED = hasattr(SegmentationTypeValues, "LABELMAP")
DEFAULT_SERIES_NUMBER = 1000
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC")

# --------------------------------------------------------------------------- codes
# Every code below is pydicom's DICOM PS3.16 content (pydicom.sr.codedict.codes, which is
# what highdicom's own examples use as ``codes.SCT``): SNOMED CT concept ids as the DICOM
# standard lists them. Category: CID 7150 "Segmentation Property Categories"; types: CID 7192
# "Anatomical Structure Segmentation Property Type" (all of them) and CID 7151; laterality:
# CID 244 "Laterality" as the Segmented Property Type Modifier.
ANATOMICAL_STRUCTURE: Code = codes.SCT.AnatomicalStructure   # SCT 91723000
GENERIC_CATEGORY: Code = codes.SCT.Tissue                     # SCT 85756007 (CID 7150)
GENERIC_TYPE: Code = codes.SCT.Tissue                         # SCT 85756007 (CID 7191)
LEFT: Code = codes.SCT.Left                                   # SCT 7771000
RIGHT: Code = codes.SCT.Right                                 # SCT 24028007


@dataclass(frozen=True)
class _Structure:
    type: Code
    paired: bool   # a left/right structure: a laterality in the label becomes the type modifier


# the structures of ../shared/data/volumes (and their usual synonyms), keyed by normalised label
STRUCTURES: Mapping[str, _Structure] = {
    "brain": _Structure(codes.SCT.Brain, False),                       # 12738006
    "cerebellum": _Structure(codes.SCT.Cerebellum, True),              # 113305005
    "caudate": _Structure(codes.SCT.CaudateNucleus, True),             # 11000004
    "caudate nucleus": _Structure(codes.SCT.CaudateNucleus, True),
    "putamen": _Structure(codes.SCT.Putamen, True),                    # 89278009
    "pallidum": _Structure(codes.SCT.GlobusPallidus, True),            # 14738005
    "globus pallidus": _Structure(codes.SCT.GlobusPallidus, True),
    "thalamus": _Structure(codes.SCT.Thalamus, True),                  # 42695009
    "hippocampus": _Structure(codes.SCT.Hippocampus, True),            # 5366008
    "amygdala": _Structure(codes.SCT.Amygdala, True),                  # 4958002
    "head": _Structure(codes.SCT.Head, False),                         # 69536005
    "skull": _Structure(codes.SCT.Skull, False),                       # 89546000
    "skull bone": _Structure(codes.SCT.Skull, False),
    "white matter": _Structure(codes.SCT.WhiteMatter, True),           # 389080008
    "grey matter": _Structure(codes.SCT.GrayMatter, True),             # 389081007
    "gray matter": _Structure(codes.SCT.GrayMatter, True),
}
_LATERALITY = {"left": LEFT, "right": RIGHT, "l": LEFT, "r": RIGHT, "lh": LEFT, "rh": RIGHT}
_LATERALITY_ANYWHERE = ("left", "right")   # "l"/"r"/"lh"/"rh" only as the first or last word


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: ``label`` (SegmentLabel, at most 64 characters) and optionally its codes
    (pydicom ``Code`` or highdicom ``CodedConcept``: scheme designator, value, meaning).
    Give both ``category_code`` and ``type_code``, or neither (then they come from the label,
    see :func:`segment_codes`); ``type_modifier_code`` (e.g. laterality) only with them."""

    label: str
    category_code: CodeLike | None = None
    type_code: CodeLike | None = None
    type_modifier_code: CodeLike | None = None


@dataclass(frozen=True)
class SegOptions:
    """How a caller wants a SEG written (``medseg.v1.DicomSegOptions``): its ``segments`` in
    order (fewer than the masks: the rest are "segment N" with the generic codes),
    ``kind`` (:data:`KINDS`) and ``series_description`` ("": the gateway's default)."""

    segments: tuple[SegmentSpec, ...] = ()
    kind: str = "binary"
    series_description: str = ""

    def specs(self, count: int) -> list[SegmentSpec]:
        """One :class:`SegmentSpec` per mask; InvalidArgument when more are described."""
        if len(self.segments) > count:
            raise InvalidArgument(f"dicom_seg describes {len(self.segments)} segments but the answer has {count} "
                                  f"mask(s) (one segment per prompt; a volume's segment is one)")
        given = [spec if spec.label else SegmentSpec(f"segment {i}", spec.category_code, spec.type_code,
                                                     spec.type_modifier_code)
                 for i, spec in enumerate(self.segments, 1)]
        return given + [SegmentSpec(f"segment {i}") for i in range(len(given) + 1, count + 1)]


def new_uid() -> str:
    """A new DICOM UID (for a SEG's series and instance)."""
    return str(hd.UID())


@dataclass(frozen=True)
class SegmentCodes:
    category: CodeLike
    type: CodeLike
    modifier: CodeLike | None   # Segmented Property Type Modifier (laterality), or None
    source: str                 # "caller", "table" or "generic"


@dataclass(frozen=True)
class Algorithm:
    """Segment Algorithm Identification: the model's ``name`` and ``version``; ``family`` a
    code, or the meaning of one in CID 7162 (e.g. "Artificial Intelligence", the default);
    ``type`` SEMIAUTOMATIC (prompted by a user, the default) or AUTOMATIC."""

    name: str
    version: str
    family: str | CodeLike = "Artificial Intelligence"
    type: str = "SEMIAUTOMATIC"


def _words(label: str) -> list[str]:
    cleaned = "".join(ch.lower() if ch.isalnum() else " " for ch in label)
    return cleaned.split()


def segment_codes(spec: SegmentSpec) -> SegmentCodes:
    """The category, type and modifier codes of ``spec``: the caller's, else the table entry
    of its label, else the generic Tissue/Tissue.

    Label lookup: lower case, punctuation and underscores as spaces; "left"/"right"
    anywhere, or "l"/"r"/"lh"/"rh" as the first or last word, is the laterality (of a paired
    structure only: "caudate_left", "Left-Caudate", "l putamen"); the rest must be a key of
    :data:`STRUCTURES` ("skull_bone" -> "skull bone")."""
    if (spec.category_code is None) != (spec.type_code is None):
        raise InvalidArgument(f"segment {spec.label!r}: give both category_code and type_code, or neither")
    if spec.category_code is not None:
        return SegmentCodes(spec.category_code, spec.type_code, spec.type_modifier_code, "caller")
    if spec.type_modifier_code is not None:
        raise InvalidArgument(f"segment {spec.label!r}: type_modifier_code needs category_code and type_code")
    words = _words(spec.label)
    laterality = None
    for i, word in enumerate(words):
        if word in _LATERALITY and (word in _LATERALITY_ANYWHERE or i in (0, len(words) - 1)):
            if laterality is not None:
                laterality = None   # two lateralities: not a table structure
                words = []
                break
            laterality = _LATERALITY[word]
            words = words[:i] + words[i + 1:]
            break
    structure = STRUCTURES.get(" ".join(words))
    if structure is not None and (laterality is None or structure.paired):
        return SegmentCodes(ANATOMICAL_STRUCTURE, structure.type, laterality, "table")
    return SegmentCodes(GENERIC_CATEGORY, GENERIC_TYPE, None, "generic")


def _coded(code: CodeLike, what: str) -> hd.sr.CodedConcept:
    try:
        if isinstance(code, hd.sr.CodedConcept):
            return code
        if isinstance(code, Code):
            return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning, code.scheme_version)
    except (TypeError, ValueError, AttributeError):
        raise InvalidArgument(f"{what} is not a valid code (scheme designator, value and meaning)") from None
    raise InvalidArgument(f"{what} must be a pydicom Code or a highdicom CodedConcept")


def _family(family: str | CodeLike) -> hd.sr.CodedConcept:
    if isinstance(family, str):
        wanted = family.strip().lower()
        for code in codes.cid7162.concepts.values():   # CID 7162 "Algorithm Family"
            if code.meaning.lower() == wanted:
                return _coded(code, "algorithm family")
        raise InvalidArgument("algorithm family must be a code, or the meaning of one in DICOM CID 7162 "
                              "(e.g. 'Artificial Intelligence')")
    return _coded(family, "algorithm family")


# --------------------------------------------------------------------------- value checks
def _check_vr(value: str | None, vr: str, what: str, rule: str) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    try:
        validate_value(vr, value, dicom_config.RAISE)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what} is not a valid DICOM {vr} value ({rule})") from None


_LO = "at most 64 characters, no backslash or control characters"
_CS = "at most 16 characters of upper-case letters, digits, space and underscore"
_PN = "a person name: components separated by '^', at most 64 characters per component group"


def _mask_plane(value: object, k: int, n_segments: int, shape: tuple[int, int]) -> np.ndarray:
    """``masks[k]`` as bool ``(segments, rows, columns)``, checked (messages: shapes only)."""
    mask = np.asarray(value)
    expected = (n_segments, *shape) if n_segments > 1 else shape
    if mask.shape == (1, *shape) and n_segments == 1:
        mask = mask[0]
    if mask.shape != expected:
        raise InvalidArgument(f"the mask of slice {k} has shape {mask.shape}; its source instance needs "
                              f"{expected} ({'segments, ' if n_segments > 1 else ''}rows, columns)")
    if mask.dtype != np.bool_:
        if mask.dtype.kind not in "iu" or not ((mask == 0) | (mask == 1)).all():
            raise InvalidArgument(f"the mask of slice {k} must be bool or 0/1 integers")
        mask = mask != 0
    return mask.reshape(n_segments, *shape)


def _source_checks(sources: Sequence[pydicom.Dataset]) -> tuple[int, int]:
    """One study, series and Frame of Reference; single-frame images of one size; distinct
    instances. Returns (rows, columns). Messages name attributes and instance numbers only."""
    if not sources:
        raise InvalidArgument("a DICOM SEG needs at least one source instance")
    for i, ds in enumerate(sources, 1):
        if not isinstance(ds, pydicom.Dataset):
            raise InvalidArgument(f"source instance {i} is not a pydicom Dataset")
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows",
                        "Columns"):
            if ds.get(keyword) in (None, ""):
                raise InvalidArgument(f"source instance {i} has no {keyword}")
        if int(ds.get("NumberOfFrames") or 1) > 1:
            raise InvalidArgument(f"source instance {i} is a multi-frame image: a SEG of a multi-frame source is "
                                  "not supported; send single-frame images")
    first = sources[0]
    for keyword, what in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                          ("FrameOfReferenceUID", "Frame of Reference")):
        if len({str(ds.get(keyword) or "") for ds in sources}) > 1:
            raise InvalidArgument(f"the source instances belong to more than one {what}: a SEG here is of one series")
    if len({str(ds.SOPInstanceUID) for ds in sources}) != len(sources):
        raise InvalidArgument("a source instance is given twice (the same SOP Instance UID)")
    shape = (int(first.Rows), int(first.Columns))
    for i, ds in enumerate(sources, 1):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise InvalidArgument(f"source instance {i} is {int(ds.Columns)}x{int(ds.Rows)} pixels, instance 1 "
                                  f"{shape[1]}x{shape[0]}: the source images must be of one size")
    return shape


# type 2 attributes highdicom reads from the first source (required to be present, may be
# empty): a sloppy source without them still gets a SEG, with them empty
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime")


def _complete(ds: pydicom.Dataset) -> pydicom.Dataset:
    missing = [keyword for keyword in _TYPE2 if keyword not in ds]
    if not missing:
        return ds
    ds = copy.deepcopy(ds)  # copy.copy would share the element dict with the caller's data set
    for keyword in missing:
        setattr(ds, keyword, None)
    return ds


# --------------------------------------------------------------------------- quiet libraries
class _DropInQuietThreads(logging.Filter):
    """Drops the records a thread logs while it builds a SEG; other threads' pass."""

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003 - logging's name
        return not getattr(_quiet, "depth", 0)


_quiet = threading.local()
_DROP = _DropInQuietThreads()
_QUIET_LIBRARIES = ("highdicom", "pydicom")
_install_lock = threading.Lock()


def _quiet_showwarning(message, category, filename, lineno, file=None, line=None):  # warnings' signature
    if getattr(_quiet, "depth", 0):
        return
    _quiet_showwarning.wrapped(message, category, filename, lineno, file, line)


_quiet_showwarning.wrapped = warnings.showwarning


def _install_filters() -> None:
    """The drop filter on every highdicom/pydicom logger (their modules log on their own
    loggers, which do not pass a parent's filters) and the warnings hook; idempotent, and
    re-done on each build for loggers made since and a ``warnings.showwarning`` replaced since
    (e.g. by ``logging.captureWarnings`` or a test's ``catch_warnings``)."""
    with _install_lock:
        names = {name for name in list(logging.root.manager.loggerDict)
                 if name.split(".", 1)[0] in _QUIET_LIBRARIES} | set(_QUIET_LIBRARIES)
        for name in names:
            logging.getLogger(name).addFilter(_DROP)   # no-op when already there
        if warnings.showwarning is not _quiet_showwarning:
            _quiet_showwarning.wrapped = warnings.showwarning
            warnings.showwarning = _quiet_showwarning


@contextmanager
def _libraries_silenced() -> Iterator[None]:
    """While this thread builds a SEG, drop what highdicom and pydicom log and warn in it
    (their messages may hold tag values); other threads log and warn as usual."""
    _install_filters()
    _quiet.depth = getattr(_quiet, "depth", 0) + 1
    try:
        yield
    finally:
        _quiet.depth -= 1


# --------------------------------------------------------------------------- writing
def write_seg(source_datasets: Sequence[pydicom.Dataset], masks: Mapping[int, np.ndarray],
              segments: Sequence[SegmentSpec], algorithm: Algorithm | tuple[str, str, str | CodeLike], *,
              series_description: str = "Segmentation", content_creator: str | None = None,
              kind: str = "binary", content_label: str | None = "SEGMENTATION",
              content_description: str | None = None, series_number: int = DEFAULT_SERIES_NUMBER,
              instance_number: int = 1, series_instance_uid: str | None = None,
              sop_instance_uid: str | None = None, manufacturer: str = "medseg",
              manufacturer_model_name: str = "medseg gateway", software_versions: str = __version__,
              device_serial_number: str = "0") -> bytes:
    """One DICOM SEG instance (Part 10 bytes, Explicit VR Little Endian) of ``masks`` on
    ``source_datasets`` (module docstring). ``algorithm``: an :class:`Algorithm` or a
    ``(name, version, family)`` tuple. ``content_creator``: ContentCreatorName (a DICOM
    person name, e.g. "MEDSEG^GATEWAY"), empty by default.

    :class:`InvalidArgument` for what is wrong with the arguments (no patient data in it).
    """
    if kind not in KINDS:
        raise InvalidArgument(f"kind must be one of {', '.join(KINDS)}")
    if kind == "labelmap" and not LABELMAP_SUPPORTED:
        raise InvalidArgument(f"the installed highdicom {hd.__version__} cannot write LABELMAP segmentations "
                              "(SegmentationTypeValues.LABELMAP needs highdicom 0.23 or later); use kind='binary'")
    if not isinstance(algorithm, Algorithm):
        try:
            algorithm = Algorithm(*algorithm)
        except TypeError:
            raise InvalidArgument("algorithm must be an Algorithm or a (name, version, family) tuple") from None
    if algorithm.type not in ALGORITHM_TYPES:
        raise InvalidArgument(f"algorithm type must be one of {', '.join(ALGORITHM_TYPES)}")
    if not algorithm.name or not algorithm.version:
        raise InvalidArgument("the algorithm needs a name and a version")
    _check_vr(algorithm.name, "LO", "the algorithm name", _LO)
    _check_vr(algorithm.version, "LO", "the algorithm version", _LO)
    _check_vr(series_description, "LO", "series_description", _LO)
    _check_vr(content_description, "LO", "content_description", _LO)
    _check_vr(content_label, "CS", "content_label", _CS)
    _check_vr(content_creator or None, "PN", "content_creator", _PN)
    for what, value in (("manufacturer", manufacturer), ("manufacturer_model_name", manufacturer_model_name),
                        ("software_versions", software_versions), ("device_serial_number", device_serial_number)):
        _check_vr(value, "LO", what, _LO)
    for what, number in (("series_number", series_number), ("instance_number", instance_number)):
        if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 2 ** 31:
            raise InvalidArgument(f"{what} must be an integer from 0 to 2**31 - 1")
    if not segments:
        raise InvalidArgument("a DICOM SEG needs at least one segment")
    sources = list(source_datasets)
    shape = _source_checks(sources)

    family = _family(algorithm.family)
    descriptions = []
    for number, spec in enumerate(segments, 1):
        if not isinstance(spec, SegmentSpec):
            raise InvalidArgument(f"segment {number} is not a SegmentSpec")
        if not spec.label:
            raise InvalidArgument(f"segment {number} has no label")
        _check_vr(spec.label, "LO", f"the label of segment {number}", _LO)
        found = segment_codes(spec)
        descriptions.append((spec.label, _coded(found.category, f"segment {number}'s category code"),
                             _coded(found.type, f"segment {number}'s type code"),
                             None if found.modifier is None else
                             _coded(found.modifier, f"segment {number}'s type modifier code")))

    planes: dict[int, np.ndarray] = {}
    for key, value in masks.items():
        try:
            k = operator.index(key)
        except TypeError:
            raise InvalidArgument("mask slice indices must be integers") from None
        if isinstance(key, bool) or not 0 <= k < len(sources):
            raise InvalidArgument(f"mask slice index {k} is out of range: there are {len(sources)} source "
                                  "instance(s)")
        planes[k] = _mask_plane(value, k, len(segments), shape)
    if kind == "labelmap":
        for k, plane in planes.items():
            if len(segments) > 1 and (plane.sum(axis=0, dtype=np.uint16) > 1).any():
                raise InvalidArgument(f"segments overlap on slice {k}: a LABELMAP SEG needs non-overlapping "
                                      "segments; use kind='binary'")
    keep = sorted(k for k, plane in planes.items() if plane.any())
    omit_empty = bool(keep)
    if not keep:
        keep = [min(planes) if planes else 0]   # a SEG needs a frame: one empty frame
        planes.setdefault(keep[0], np.zeros((len(segments), *shape), dtype=bool))
    stack = np.stack([planes[k] for k in keep])   # (frames, segments, rows, columns)
    if kind == "labelmap":
        dtype = np.uint8 if len(segments) < 256 else np.uint16
        labels = np.zeros((len(keep), *shape), dtype=dtype)
        for s in range(len(segments)):
            labels[stack[:, s]] = s + 1
        pixel_array = labels
    elif len(segments) == 1:
        pixel_array = stack[:, 0]
    else:
        pixel_array = np.moveaxis(stack, 1, -1)   # stacked segments: (frames, rows, columns, segments)
    del stack
    kept = set(keep)

    with _libraries_silenced():
        chosen = [_complete(sources[k]) for k in keep]
        further = [sources[k] for k in range(len(sources)) if k not in kept] or None
        try:
            identification = hd.AlgorithmIdentificationSequence(name=algorithm.name, family=family,
                                                                 version=algorithm.version)
            segment_descriptions = []
            for number, (label, category, type_, modifier) in enumerate(descriptions, 1):
                description = hd.seg.SegmentDescription(
                    segment_number=number, segment_label=label, segmented_property_category=category,
                    segmented_property_type=type_, algorithm_type=algorithm.type,
                    algorithm_identification=identification)
                if modifier is not None:
                    # PS3.3 C.8.20.2: nested in the Segmented Property Type Code Sequence item
                    description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = \
                        [modifier]
                segment_descriptions.append(description)
            seg = hd.seg.Segmentation(
                source_images=chosen, pixel_array=pixel_array,
                segmentation_type=SegmentationTypeValues.LABELMAP if kind == "labelmap"
                else SegmentationTypeValues.BINARY,
                segment_descriptions=segment_descriptions,
                series_instance_uid=series_instance_uid or hd.UID(), series_number=series_number,
                sop_instance_uid=sop_instance_uid or hd.UID(), instance_number=instance_number,
                manufacturer=manufacturer, manufacturer_model_name=manufacturer_model_name,
                software_versions=software_versions, device_serial_number=device_serial_number,
                content_label=content_label, content_description=content_description,
                content_creator_name=content_creator or None, omit_empty_frames=omit_empty,
                further_source_images=further, series_description=series_description)
            out = io.BytesIO()
            pydicom.dcmwrite(out, seg, enforce_file_format=True)
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            # highdicom's and pydicom's messages may quote source values: only the type is told
            raise InvalidArgument(f"the DICOM SEG could not be built from these source instances and masks "
                                  f"({type(exc).__name__} in highdicom)") from None
    return out.getvalue()


def write_volume_seg(volume: Volume, masks: Mapping[int, np.ndarray], segments: Sequence[SegmentSpec],
                     algorithm: Algorithm | tuple[str, str, str | CodeLike], **options: object) -> bytes:
    """:func:`write_seg` of a DICOM-series :class:`~service.core.volume.Volume`: ``masks``
    maps slice index -> bool ``(H, W)`` in MODEL orientation (what the volume service keeps,
    as :meth:`Volume.mask_array` takes), or ``(segments, H, W)``; each is turned back to its
    file's rows/columns by :meth:`Volume.mask_to_input`. ``options``: :func:`write_seg`'s."""
    headers = volume.dicom_headers()
    planes: dict[int, np.ndarray] = {}
    for k, mask in masks.items():
        mask = np.asarray(mask)
        if mask.ndim == 3:
            planes[k] = np.stack([volume.mask_to_input(m) for m in mask])
        else:
            planes[k] = volume.mask_to_input(mask)
    return write_seg(headers, planes, segments, algorithm, **options)  # type: ignore[arg-type]
