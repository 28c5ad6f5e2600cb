"""Answers as DICOM Segmentation objects: what the gateway adds to the SEG writer of
:mod:`service.core.dicom_seg` (which knows nothing of models or requests).

* :func:`source_header`: the header a 2-D Segment's SEG references, or the client error
  saying why this input cannot have one (not DICOM, an ``image_id``, a multi-frame image).
* :func:`algorithm`: the model as the Segment Algorithm Identification (name, version,
  family "Artificial Intelligence"; AUTOMATIC for a prompt-free segmenter, SEMIAUTOMATIC
  for a prompted one).
* :func:`write_image_seg` and :func:`write_segment_seg`: one SEG of a 2-D answer (one
  segment per prompt) and of a volume's segment, with the gateway's defaults
  (:class:`SegDefaults`, from ``--seg-series-description`` / ``--seg-content-creator``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pydicom

from service.core import errors
from service.core.dicom_seg import Algorithm, SegOptions, new_uid, write_seg, write_volume_seg
from service.core.domain import ImageLimits, MaskResult, ModelInfo, SegmentRequest
from service.core.imageio import dicom_header
from service.core.volume import Volume

__all__ = ["SegDefaults", "SegWritten", "algorithm", "source_header", "write_image_seg", "write_segment_seg"]


@dataclass(frozen=True)
class SegDefaults:
    series_description: str = "medseg segmentation"
    content_creator: str = ""

    @classmethod
    def from_settings(cls, settings) -> "SegDefaults":
        return cls(settings.seg_series_description, settings.seg_content_creator)


@dataclass(frozen=True)
class SegWritten:
    data: bytes                 # the SEG instance, DICOM Part 10
    sop_instance_uid: str
    series_instance_uid: str


def algorithm(model: ModelInfo, automatic: bool) -> Algorithm:
    return Algorithm(model.name, model.version or "1", "Artificial Intelligence",
                     "AUTOMATIC" if automatic else "SEMIAUTOMATIC")


def source_header(request: SegmentRequest, limits: ImageLimits) -> pydicom.Dataset:
    """The header of the DICOM image a 2-D SEG answer references (checked before any model
    runs); InvalidArgument saying what to send instead."""
    if request.image is None:
        raise errors.InvalidArgument("MASK_ENCODING_DICOM_SEG needs the DICOM image itself (image.encoded): a SEG "
                                     "references its source instance, which an image_id does not keep; send the "
                                     "image again, or ask for BITS, PNG or COCO_RLE masks")
    data = request.image.encoded
    if not data or data[128:132] != b"DICM":
        raise errors.InvalidArgument("MASK_ENCODING_DICOM_SEG is for DICOM input: this image is not a DICOM Part 10 "
                                     "file; ask for BITS, PNG or COCO_RLE masks")
    header = dicom_header(data, limits)
    if int(header.get("NumberOfFrames") or 1) > 1:
        raise errors.InvalidArgument("MASK_ENCODING_DICOM_SEG of a multi-frame DICOM image is not supported: send "
                                     "single-frame images (or the series as a volume), or ask for BITS, PNG or "
                                     "COCO_RLE masks")
    return header


def _options(options: object | None) -> SegOptions:
    return options if isinstance(options, SegOptions) else SegOptions()


def _identity(options: SegOptions, defaults: SegDefaults) -> dict[str, object]:
    return {"kind": options.kind, "series_description": options.series_description or defaults.series_description,
            "content_creator": defaults.content_creator or None}


def _plane(result: MaskResult, height: int, width: int) -> np.ndarray:
    if result.mask is not None:
        return np.asarray(result.mask, dtype=bool)
    if result.encoded is None:
        raise errors.BackendError("a mask has neither pixels nor bits")
    bits = np.unpackbits(np.frombuffer(result.encoded, dtype=np.uint8), count=height * width)
    return bits.reshape(height, width).astype(bool)


def write_image_seg(header: pydicom.Dataset, masks: Sequence[MaskResult], height: int, width: int,
                    model: ModelInfo, automatic: bool, options: object | None, defaults: SegDefaults) -> SegWritten:
    """One SEG of a 2-D answer: segment ``i + 1`` is ``masks[i]`` (bool pixels, or BITS
    payloads of ``height x width``), on the one frame of ``header``."""
    chosen = _options(options)
    specs = chosen.specs(len(masks))
    stack = np.stack([_plane(m, height, width) for m in masks])
    sop, series = _new_uids()
    data = write_seg([header], {0: stack if len(masks) > 1 else stack[0]}, specs, algorithm(model, automatic),
                     sop_instance_uid=sop, series_instance_uid=series, **_identity(chosen, defaults))
    return SegWritten(data, sop, series)


def write_segment_seg(volume: Volume, masks: Mapping[int, np.ndarray], model: ModelInfo, automatic: bool,
                      options: object | None, defaults: SegDefaults) -> SegWritten:
    """One SEG of a volume's segment (``masks``: slice -> bool mask in model orientation, as
    the volume service keeps them); INVALID_ARGUMENT for a volume that is not a DICOM series."""
    if volume.source_format != "dicom_series":
        raise errors.InvalidArgument(f"a DICOM SEG needs a DICOM series: this volume was uploaded as "
                                     f"{volume.source_format}; ask for the NIfTI mask (GetSegmentMask without "
                                     "dicom_seg)")
    chosen = _options(options)
    sop, series = _new_uids()
    data = write_volume_seg(volume, masks, chosen.specs(1), algorithm(model, automatic), sop_instance_uid=sop,
                            series_instance_uid=series, **_identity(chosen, defaults))
    return SegWritten(data, sop, series)


def _new_uids() -> tuple[str, str]:
    return new_uid(), new_uid()
