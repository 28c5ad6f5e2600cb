"""A series from the PACS, segmented and written back: ``medseg.v1.Volumes/SegmentStudy``.

One call: retrieve the series by WADO-RS (:class:`service.backends.pacs.DicomWebPacs`,
bounded by the volume limits before and while it arrives), load it as an uploaded DICOM
series is loaded (:meth:`VolumeService.upload`, same checks and store bounds, owned by the
caller), segment it as ``SegmentVolume`` does, write the DICOM SEG of the segment, and store
it back by STOW-RS when asked. The volume is forgotten at the end unless the caller keeps it
(then it is an ordinary volume of the caller: refine, undo, GetSegmentMask).

Nothing here logs; errors carry no UID or tag value (the PACS adapter hashes UIDs).
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass, replace
from typing import Callable, Protocol

import pydicom

from service.core import errors
from service.core.dicom_seg import SegOptions
from service.core.domain import Box, MaskEncoding, Window
from service.core.volume import VolumeSource
from service.inference import work
from service.inference.seg_output import SegWritten
from service.inference.volumes import SegmentVolumeRequest, VolumeInfo, VolumeService, VolumeSummary


class Pacs(Protocol):
    """What SegmentStudy needs of a PACS (blocking; run in a worker thread)."""

    def retrieve_series(self, study_uid: str, series_uid: str, *, max_bytes: int, max_files: int,
                        check: Callable[[], None] | None = None) -> list[bytes]: ...

    def store(self, instance: bytes) -> None: ...


@dataclass(frozen=True)
class StudyRequest:
    study_uid: str
    series_uid: str
    model: str                      # resolved by Gateway.model_name
    slice_index: int | None = None
    box: Box | None = None
    first_slice: int | None = None
    last_slice: int | None = None
    window: Window | None = None
    store: bool = False
    return_dicom_seg: bool = False
    dicom_seg: SegOptions = SegOptions()
    keep_volume: bool = False


@dataclass(frozen=True)
class StudyResult:
    volume: VolumeInfo              # volume_id "" unless kept
    summary: VolumeSummary
    seg: SegWritten
    stored: bool
    instances: int
    timings_ms: dict[str, float]


NO_PACS = ("this gateway has no PACS configured: its operator sets --pacs-url (and credentials) to segment series "
           "by UID; upload the series with UploadVolume instead")


class StudyService:
    def __init__(self, volumes: VolumeService, pacs: Pacs | None) -> None:
        self._volumes, self._pacs = volumes, pacs

    @property
    def configured(self) -> bool:
        return self._pacs is not None

    async def segment_study(self, request: StudyRequest, owner: str) -> StudyResult:
        if self._pacs is None:
            raise errors.FailedPrecondition(NO_PACS)
        volumes, limits = self._volumes, self._volumes.limits
        timings: dict[str, float] = {}
        start = clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = (now - clock) * 1e3
            clock = now

        call = work.current()
        # a call that expires or whose client goes away stops the transfer at its next chunk
        check = None if call is None else (lambda: call.check("retrieving the series from the PACS"))
        with volumes.begin_upload(owner) as reservation:
            files = await work.run_in_thread(self._pacs.retrieve_series, request.study_uid, request.series_uid,
                                             max_bytes=limits.max_volume_bytes, max_files=limits.max_files,
                                             check=check)
            lap("retrieve")
            reservation.grow(sum(len(f) for f in files))
            await work.run_in_thread(_check_series, files, request.study_uid, request.series_uid)
            info = await volumes.upload(VolumeSource("dicom_series", files=tuple(files), window=request.window),
                                        owner, reservation)
        count = len(files)
        del files
        lap("decode")
        kept = False
        try:
            summary = None
            segment = SegmentVolumeRequest(volume_id=info.volume_id, model=request.model,
                                           slice_index=request.slice_index, box=request.box,
                                           first_slice=request.first_slice, last_slice=request.last_slice,
                                           encoding=MaskEncoding.COCO_RLE)
            async for item in volumes.segment(segment, owner):
                if isinstance(item, VolumeSummary):
                    summary = item
            if summary is None:  # pragma: no cover - the volume service always ends with one
                raise errors.BackendError("segmenting ended without a summary")
            lap("segment")
            result = await volumes.mask(info.volume_id, summary.segment_id, owner, nifti=False, slices=False,
                                        dicom_seg=request.dicom_seg)
            seg = result.dicom_seg
            assert seg is not None
            lap("write_seg")
            stored = False
            if request.store:
                await work.run_in_thread(self._pacs.store, seg.data)
                stored = True
                lap("store")
            kept = request.keep_volume
        finally:
            if not kept:
                volumes.delete(info.volume_id, owner)
            # the retrieved files, the SEG's buffers and (unless kept) the volume are freed by now:
            # give their heap pages back, as an upload does (work.release_free_heap)
            await work.run_in_thread(work.release_free_heap)
        timings["total"] = (time.perf_counter() - start) * 1e3
        volume = info if kept else _forgotten(info)
        return StudyResult(volume, summary, seg, stored, count, timings)


def _forgotten(info: VolumeInfo) -> VolumeInfo:
    return replace(info, volume_id="", expires_in_s=0.0)


def _check_series(files: list[bytes], study_uid: str, series_uid: str) -> None:
    """The PACS answered the series asked for (a misrouted answer must not be segmented and
    stored as if it were): the first instance's UIDs (load_volume checks that all agree)."""
    if not files:
        raise errors.SeriesNotFound("the PACS returned no instances for this series")
    ds = pydicom.dcmread(io.BytesIO(files[0]), stop_before_pixels=True, force=True,
                         specific_tags=["StudyInstanceUID", "SeriesInstanceUID"])
    if str(ds.get("StudyInstanceUID", "")) != study_uid or str(ds.get("SeriesInstanceUID", "")) != series_uid:
        raise errors.PacsUnavailable("the PACS answered with instances of another study or series than the one "
                                     "asked for; the gateway did not segment them (report it to the PACS's "
                                     "operator)")
