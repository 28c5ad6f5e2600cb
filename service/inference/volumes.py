"""Volumes in the gateway: upload once, segment in 3-D (streamed), refine (a box, clicks or
an erase), undo, fetch.

The 3-D work is the algorithm of :mod:`service.inference.propagation` (anchors, boxes
interpolated between them, propagation beyond them), driven here through the gateway's
backend exactly as the 2-D pipeline drives its model calls: the same
:class:`service.inference.predictor.SamPredictor` steps, the same ``backend.infer``, the same
call bounds (:mod:`service.inference.work`: a cancelled or expired call stops before its
next slice). Each slice's mask is yielded as soon as it is done.

State: volumes and their segment sessions live in a :class:`VolumeStore` (in-process now);
slice embeddings in a bytes-bounded LRU (``--volume-embedding-bytes``), so refinements and
undo reuse them. A session keeps its interactions (anchors, erased ranges) and the results
of the pieces its states need; refinements of one segment run one at a time (a lock per
session), different sessions independently. Coordinates at this layer's boundary are the
input convention of :mod:`service.core.volume`; inside, model orientation.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Generator

import numpy as np

from service.backends.base import Backend
from service.core import errors
from service.core.dicom_seg import SegOptions
from service.core.domain import Box, MaskEncoding, Point, PromptKind, Window
from service.core.mask_codec import encode_mask
from service.core.prompts import check_box
from service.core.segmenter_io import postprocess, slice_inputs
from service.core.volume import Volume, VolumeLimits, VolumeSource, estimate_volume_bytes, load_volume
from service.inference import propagation as prop
from service.inference import work
from service.inference.cache import ImageCache
from service.inference.observer import Observer
from service.inference.pipeline import SamPipeline
from service.inference.predictor import Embedding
from service.inference.seg_output import SegDefaults, SegWritten, write_segment_seg
from service.inference.segmenter_pipeline import SegmenterPipeline
from service.inference.volume_store import InProcessVolumeStore, StoredVolume, VolumeStore

HISTORY = 32            # interactions a session keeps (undo steps)
MAX_SLICE_CLICKS = 64   # clicks one slice's anchor may hold (each is a decoder round when it is recomputed)
SEGMENTER_BATCH = 8     # slices per prompt-free segmenter call (when its entry batches)


@dataclass(frozen=True)
class VolumeInfo:
    volume_id: str
    depth: int                      # slices
    height: int                     # rows of one slice, input convention
    width: int                      # columns of one slice, input convention
    spacing_mm: tuple[float, float, float]   # (row, column, slice), input convention
    window: Window
    window_source: str
    source_format: str
    stored_bytes: int
    expires_in_s: float


@dataclass(frozen=True)
class SegmentVolumeRequest:
    volume_id: str
    model: str                      # already resolved by Gateway.model_name
    segment_id: str = ""            # empty: the gateway makes one
    slice_index: int | None = None  # the slice the box is on (promptable models)
    box: Box | None = None          # input-convention pixels of that slice
    first_slice: int | None = None  # optional range [first_slice, last_slice], inclusive
    last_slice: int | None = None
    encoding: MaskEncoding = MaskEncoding.COCO_RLE


@dataclass(frozen=True)
class RefineRequest:
    volume_id: str
    segment_id: str
    # exactly one action: a box on another slice, clicks on a slice (input-convention pixels
    # of slice_index), or erasing slices [erase_first, erase_last]
    slice_index: int | None = None
    box: Box | None = None
    erase_first: int | None = None
    erase_last: int | None = None
    encoding: MaskEncoding = MaskEncoding.COCO_RLE
    points: tuple[Point, ...] = ()


@dataclass(frozen=True)
class SliceMask:
    """One slice of a segment, streamed as soon as it is done (an empty mask: the slice was
    cleared). ``encoded``: the mask in ``encoding``, input convention, ``(height, width)``."""

    slice_index: int
    height: int
    width: int
    encoding: MaskEncoding
    encoded: bytes
    predicted_iou: float
    area: int


@dataclass(frozen=True)
class VolumeSummary:
    """The last message of a streamed answer."""

    volume_id: str
    segment_id: str
    model: str
    model_version: str
    voxel_count: int
    volume_ml: float
    first_slice: int                # -1 when the segment is empty
    last_slice: int
    slices_changed: int
    stop_reasons: tuple[str, ...]   # why propagation stopped on each side ("range end", "mask vanished", ...)
    timings_ms: dict[str, float] = field(default_factory=dict)   # per stage: embed, decode, postprocess, total
    embeddings_reused: int = 0
    interactions: int = 0           # interactions in the session's history now (undo steps available)


@dataclass(frozen=True)
class SegmentMaskResult:
    summary: VolumeSummary
    nifti_gz: bytes                 # the 3-D mask on the input's grid and affine (uint8 {0,1}); b"" if not asked
    slices: tuple[SliceMask, ...]   # every non-empty slice (input convention)
    dicom_seg: SegWritten | None = None   # when asked: the segment as a DICOM SEG of the series


@dataclass
class Session:
    """One segment of one volume: its history of states and the pieces they need."""

    segment_id: str
    model: str
    version: str
    history: list[prop.State]
    done: dict[tuple, prop.PieceResult] = field(default_factory=dict)
    slices: dict[int, prop.SliceResult] = field(default_factory=dict)
    stops: tuple[str, ...] = ()
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def state(self) -> prop.State:
        return self.history[-1]

    def keep_needed(self) -> None:
        """Forget piece results no state in the history uses."""
        needed = {p.key for s in self.history for p in prop.plan(s)}
        self.done = {k: v for k, v in self.done.items() if k in needed}


@dataclass
class _Run:
    """Timings and counts of one streamed answer."""

    start: float = field(default_factory=time.perf_counter)
    embed_s: float = 0.0
    decode_s: float = 0.0
    post_s: float = 0.0
    embedded: int = 0
    reused: int = 0

    def timings_ms(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        return {"embed": self.embed_s * 1e3, "decode": self.decode_s * 1e3, "postprocess": self.post_s * 1e3,
                "total": total * 1e3}


class VolumeService:
    """Owned by the :class:`service.inference.gateway.Gateway` (``gateway.volumes``).
    ``owner`` is the cache scope of the caller (volumes and sessions are per scope: another
    caller's volume_id answers NOT_FOUND)."""

    def __init__(self, pipeline: Callable[[str], object], backend: Backend, metrics: Observer, settings,
                 store: VolumeStore | None = None, seg_defaults: SegDefaults | None = None) -> None:
        """``pipeline(model)``: the gateway's pipeline of a served model (NOT_FOUND for an
        unknown one, UNAVAILABLE while models load)."""
        self._pipeline = pipeline
        self._backend, self._metrics = backend, metrics
        self._timeout = settings.backend_timeout_s
        self.limits = VolumeLimits(max_volume_bytes=settings.max_volume_bytes, max_files=settings.max_series_files,
                                   max_slices=settings.max_volume_slices, max_side=settings.max_image_side)
        self.store = store or InProcessVolumeStore(
            settings.max_volume_bytes, settings.max_volumes_bytes, settings.max_caller_volumes_bytes,
            settings.volume_ttl_s, on_change=metrics.volumes_changed,
            on_expire=self._expired)
        self._embeddings = ImageCache(settings.volume_embedding_bytes, settings.volume_ttl_s)
        self.seg_defaults = seg_defaults or SegDefaults()

    # --- volumes --------------------------------------------------------------------------
    def begin_upload(self, owner: str) -> "UploadReservation":
        """The hold an upload's received bytes take against the volume bounds while it
        arrives (so that concurrent uploads cannot together exceed them)."""
        return UploadReservation(self.store, owner)

    async def upload(self, source: VolumeSource, owner: str,
                     reservation: "UploadReservation | None" = None) -> VolumeInfo:
        nbytes = await work.run_in_thread(estimate_volume_bytes, source, self.limits)
        if reservation is not None:
            reservation.grow(max(nbytes, reservation.nbytes))
        else:
            self.store.check_room(nbytes, owner)
        volume = await work.run_in_thread(load_volume, source, self.limits)
        del source
        await work.run_in_thread(work.release_free_heap)  # the upload's parts, freed by now (see there)
        if reservation is not None:
            reservation.release()  # the stored volume is counted from here on
        stored = self.store.put(volume, owner)
        self._metrics.volume_event("upload")
        return self._info(stored)

    def segment_model(self, volume_id: str, segment_id: str, owner: str) -> str:
        """The model a segment was made with (the edge authorises refinements for it)."""
        return self._session(self.store.get(volume_id, owner), segment_id).model

    def info(self, volume_id: str, owner: str) -> VolumeInfo:
        return self._info(self.store.get(volume_id, owner))

    def delete(self, volume_id: str, owner: str) -> bool:
        deleted = self.store.delete(volume_id, owner)
        if deleted:
            self._forget_embeddings(volume_id)
        return deleted

    def _expired(self, stored: StoredVolume) -> None:
        self._metrics.volume_event("expired")
        self._forget_embeddings(stored.volume_id)

    def _forget_embeddings(self, volume_id: str) -> None:
        """A deleted or expired volume's slice embeddings go with it (they can never be reused:
        a new upload gets a new id), rather than holding the LRU until evicted."""
        prefix = f"{volume_id}:"
        self._embeddings.drop_where(lambda key: key[-1].startswith(prefix))

    def _info(self, stored: StoredVolume) -> VolumeInfo:
        v = stored.volume
        h, w = v.input_slice_shape
        row, col, sl = v.spacing_mm
        spacing = (col, row, sl) if v.in_plane.transpose else (row, col, sl)
        return VolumeInfo(stored.volume_id, v.depth, h, w, spacing, v.window, v.window_source, v.source_format,
                          int(v.nbytes), self.store.expires_in(stored))

    # --- segments -------------------------------------------------------------------------
    def _session(self, stored: StoredVolume, segment_id: str) -> Session:
        session = stored.sessions.get(segment_id)
        if not isinstance(session, Session):
            raise errors.SegmentNotFound(f"segment_id {errors.shorten(segment_id)} is unknown on this volume: start it with "
                                  "SegmentVolume (sessions end when their volume expires or is deleted)")
        return session

    @staticmethod
    def _slice(volume: Volume, k: int | None, what: str) -> int:
        if k is None:
            raise errors.InvalidArgument(f"{what} is required")
        if not 0 <= k < volume.depth:
            raise errors.InvalidArgument(f"{what} {k} is outside the volume's {volume.depth} slices (0 to "
                                         f"{volume.depth - 1})")
        return int(k)

    @staticmethod
    def _model_box(volume: Volume, box: Box | None, k: int) -> Box:
        if box is None:
            raise errors.InvalidPrompt("a box on the slice is required for this model")
        h, w = volume.input_slice_shape
        checked = check_box(box, 0, h, w)
        return volume.box_to_model(checked)

    @staticmethod
    def _model_points(volume: Volume, pipeline: SamPipeline, points: tuple[Point, ...], k: int) -> tuple[Point, ...]:
        """Clicks on slice ``k`` (input convention) -> model orientation, or the client error of
        a model without point prompts or a click off the slice."""
        info = pipeline.info
        if PromptKind.POINT not in info.prompt_kinds:
            kinds = ", ".join(sorted(kind.value for kind in info.prompt_kinds))
            raise errors.UnsupportedPrompt(f"model {info.name!r} does not accept point prompts; it accepts {kinds} "
                                           "(see ListModels): refine its segment with a box or an erase")
        h, w = volume.input_slice_shape
        out = []
        for p in points:
            if not (math.isfinite(p.x) and math.isfinite(p.y) and 0 <= p.x <= w and 0 <= p.y <= h):
                raise errors.InvalidPrompt(f"point ({p.x:g}, {p.y:g}) is outside slice {k} ({w}x{h}, "
                                           "input-convention pixels)")
            m = volume.box_to_model(Box(p.x, p.y, p.x, p.y))   # a point is a box of no size
            out.append(Point(m.x0, m.y0, bool(p.positive)))
        return tuple(out)

    @staticmethod
    def _check_clicks(session: Session, step: prop.Interaction) -> None:
        """At most :data:`MAX_SLICE_CLICKS` clicks on one slice's anchor (a client error)."""
        if not step.points:
            return
        k = int(step.slice_index)
        anchor = dict(session.state.anchors).get(k)
        held = len(anchor.points) if isinstance(anchor, prop.Clicks) else 0
        if held + len(step.points) > MAX_SLICE_CLICKS:
            raise errors.InvalidPrompt(f"slice {k} would hold {held + len(step.points)} clicks; the limit is "
                                       f"{MAX_SLICE_CLICKS} (draw a box there to start it afresh)")

    def _bounds(self, volume: Volume, first: int | None, last: int | None, k: int | None) -> tuple[int, int]:
        lo = 0 if first is None else self._slice(volume, first, "range.first")
        hi = volume.depth - 1 if last is None else self._slice(volume, last, "range.last")
        if lo > hi:
            raise errors.InvalidArgument(f"range.first {lo} is after range.last {hi}")
        if k is not None and not lo <= k <= hi:
            raise errors.InvalidArgument(f"slice_index {k} is outside the range {lo} to {hi}")
        return lo, hi

    async def segment(self, request: SegmentVolumeRequest, owner: str) -> AsyncIterator[SliceMask | VolumeSummary]:
        stored = self.store.get(request.volume_id, owner)
        volume = stored.volume
        pipeline = self._pipeline(request.model)
        segment_id = request.segment_id or uuid.uuid4().hex[:16]
        if segment_id in stored.sessions:
            raise errors.InvalidArgument(f"segment_id {errors.shorten(segment_id)} already exists on this volume: "
                                         "refine it with RefineSegment, or send another (or no) segment_id")
        if isinstance(pipeline, SegmenterPipeline):
            if request.box is not None:
                raise errors.UnsupportedPrompt(f"model {pipeline.info.name!r} is a prompt-free segmenter: send no "
                                               "box; it segments every slice of the range")
            lo, hi = self._bounds(volume, request.first_slice, request.last_slice, None)
            async for item in self._segment_all(stored, pipeline, segment_id, lo, hi, request.encoding):
                yield item
            return
        k = self._slice(volume, request.slice_index, "slice_index")
        lo, hi = self._bounds(volume, request.first_slice, request.last_slice, k)
        box = self._model_box(volume, request.box, k)
        session = Session(segment_id, pipeline.info.name, pipeline.info.version, [prop.State(bounds=(lo, hi))])
        stored.sessions[segment_id] = session
        try:
            async with session.lock:
                async for item in self._interact(stored, pipeline, session, prop.Interaction(k, box),
                                                 request.encoding):
                    yield item
        except BaseException:
            if not session.slices:  # nothing came of it: the id is free again
                stored.sessions.pop(segment_id, None)
            raise

    async def refine(self, request: RefineRequest, owner: str) -> AsyncIterator[SliceMask | VolumeSummary]:
        stored = self.store.get(request.volume_id, owner)
        session = self._session(stored, request.segment_id)
        volume = stored.volume
        pipeline = self._pipeline(session.model)
        if isinstance(pipeline, SegmenterPipeline):
            raise errors.InvalidArgument(f"segments of the prompt-free model {session.model!r} cannot be refined; "
                                         "segment with a promptable model (ListModels) to refine")
        if (request.box is not None) + bool(request.points) + (request.erase_first is not None) != 1:
            raise errors.InvalidArgument("send exactly one refinement: a box on a slice, clicks on a slice, or a slice "
                                         "range to erase")
        if request.box is not None:
            k = self._slice(volume, request.slice_index, "slice_index")
            step = prop.Interaction(k, self._model_box(volume, request.box, k))
        elif request.points:
            k = self._slice(volume, request.slice_index, "slice_index")
            step = prop.Interaction(k, points=self._model_points(volume, pipeline, request.points, k))
        else:
            lo = self._slice(volume, request.erase_first, "erase.first")
            hi = self._slice(volume, request.erase_last if request.erase_last is not None else lo, "erase.last")
            if lo > hi:
                raise errors.InvalidArgument(f"erase.first {lo} is after erase.last {hi}")
            step = prop.Interaction(erase=(lo, hi))
        async with session.lock:
            self._check_clicks(session, step)   # the clicks the slice holds now, under the lock
            async for item in self._interact(stored, pipeline, session, step, request.encoding):
                yield item

    async def undo(self, volume_id: str, segment_id: str, owner: str,
                   encoding: MaskEncoding = MaskEncoding.COCO_RLE) -> AsyncIterator[SliceMask | VolumeSummary]:
        stored = self.store.get(volume_id, owner)
        session = self._session(stored, segment_id)
        pipeline = self._pipeline(session.model)
        async with session.lock:
            if len(session.history) < 2:
                raise errors.InvalidArgument("nothing to undo: this segment has no interaction left")
            async for item in self._interact(stored, pipeline, session, None, encoding):
                yield item

    async def mask(self, volume_id: str, segment_id: str, owner: str,
                   encoding: MaskEncoding = MaskEncoding.COCO_RLE, *, nifti: bool = True, slices: bool = True,
                   dicom_seg: SegOptions | None = None) -> SegmentMaskResult:
        """The segment's whole mask: as NIfTI (``nifti``), its non-empty slices (``slices``)
        and, given ``dicom_seg`` options, as a DICOM SEG of the series (a volume that is not a
        DICOM series is INVALID_ARGUMENT, before anything is built)."""
        stored = self.store.get(volume_id, owner)
        session = self._session(stored, segment_id)
        if dicom_seg is not None and stored.volume.source_format != "dicom_series":
            raise errors.InvalidArgument(f"a DICOM SEG needs a DICOM series: this volume was uploaded as "
                                         f"{stored.volume.source_format}; ask for the NIfTI mask (no dicom_seg)")
        automatic = isinstance(self._pipeline(session.model), SegmenterPipeline)
        async with session.lock:
            volume, results = stored.volume, dict(session.slices)
            run = _Run()

            def build() -> tuple[bytes, tuple[SliceMask, ...], SegWritten | None]:
                masks = {k: r.mask for k, r in results.items()}
                out = tuple(self._slice_mask(volume, k, results[k], encoding) for k in sorted(results)) if slices else ()
                seg = None
                if dicom_seg is not None:
                    model = self._pipeline(session.model).info
                    seg = write_segment_seg(volume, masks, model, automatic, dicom_seg, self.seg_defaults)
                return volume.nifti_bytes(masks) if nifti else b"", out, seg

            data, out, seg = await work.run_in_thread(build)
            return SegmentMaskResult(self._summary(stored, session, 0, run), data, out, seg)

    # --- the interaction loop -----------------------------------------------------------
    async def _interact(self, stored: StoredVolume, pipeline: SamPipeline, session: Session,
                        step: prop.Interaction | None, encoding: MaskEncoding) -> AsyncIterator[SliceMask | VolumeSummary]:
        """Apply ``step`` (None: undo the last one), stream the slices that changed, then the
        summary. The session changes only when the whole state has been computed."""
        volume = stored.volume
        state = session.history[-2] if step is None else session.state.apply(step, session.slices)
        run = _Run()
        steps = prop.run_state(state, prop.Rules(), volume.slice_shape, session.done)
        before = session.slices
        streamed: set[int] = set()
        driver = _Driver(self, stored, pipeline, run)
        finished = False
        try:
            async for done in driver.events(steps):
                old = before.get(done.slice_index)
                if old is not None and np.array_equal(old.packed, done.result.packed):
                    continue
                streamed.add(done.slice_index)
                yield await work.run_in_thread(self._slice_mask, volume, done.slice_index, done.result, encoding, run)
            results = driver.value
            slices = prop.slices_of(results.values())
            # slices of pieces reused from earlier states (undo, unchanged pieces), and cleared ones
            for k in sorted((set(before) | set(slices)) - streamed):
                new, old = slices.get(k), before.get(k)
                if new is not None and old is not None and np.array_equal(new.packed, old.packed):
                    continue
                streamed.add(k)
                if new is None:
                    yield SliceMask(k, *volume.input_slice_shape, encoding, encode_mask(
                        np.zeros(volume.input_slice_shape, bool), encoding), 0.0, 0)
                else:
                    yield await work.run_in_thread(self._slice_mask, volume, k, new, encoding, run)
            if step is None:
                session.history.pop()
            else:
                session.history.append(state)
                del session.history[1:-HISTORY]
            session.done.update(results)
            session.slices, session.stops = slices, prop.stop_reasons(state, results)
            session.keep_needed()
            finished = True
            yield self._summary(stored, session, len(streamed), run)
        finally:
            if not finished:
                self._metrics.volume_event("stream_stopped", pipeline.info.name)

    async def _segment_all(self, stored: StoredVolume, pipeline: SegmenterPipeline, segment_id: str, lo: int,
                           hi: int, encoding: MaskEncoding) -> AsyncIterator[SliceMask | VolumeSummary]:
        """A prompt-free segmenter on every slice of [lo, hi], in batches, streamed."""
        volume, run = stored.volume, _Run()
        entry = pipeline.model.entry
        batch = SEGMENTER_BATCH if entry.max_batch_size >= SEGMENTER_BATCH else 1
        session = Session(segment_id, pipeline.info.name, pipeline.info.version, [prop.State(bounds=(lo, hi))])
        slices: dict[int, prop.SliceResult] = {}
        finished = False
        try:
            for start in range(lo, hi + 1, batch):
                ks = list(range(start, min(hi, start + batch - 1) + 1))
                t = time.perf_counter()
                tensors, frame = await work.run_in_thread(self._segmenter_inputs, volume, ks, pipeline.info.input_size,
                                                          pipeline.model.context)
                work.check_current(f"the segmenter (slice {ks[0]})")
                out = await self._backend.infer(entry.name, {entry.inputs[0].name: tensors}, [entry.outputs[0].name],
                                                self._timeout)
                run.embed_s += time.perf_counter() - t
                logits = out[entry.outputs[0].name]
                for i, k in enumerate(ks):
                    mask = await work.run_in_thread(postprocess, logits[i:i + 1], frame)
                    self._metrics.volume_event("slice_segmented", pipeline.info.name)
                    if not mask.any():
                        continue
                    slices[k] = result = prop.SliceResult.of(mask, 0.0)
                    yield await work.run_in_thread(self._slice_mask, volume, k, result, encoding, run)
            session.slices = slices
            stored.sessions[segment_id] = session
            finished = True
            yield self._summary(stored, session, len(slices), run)
        finally:
            if not finished:
                self._metrics.volume_event("stream_stopped", pipeline.info.name)

    @staticmethod
    def _segmenter_inputs(volume: Volume, ks: list[int], size: int, context: int = 0):
        """The segmenter's batch for slices ``ks`` (2.5-D: with ``context`` neighbours on each
        side as channels; :func:`service.core.segmenter_io.slice_inputs`)."""
        return slice_inputs(volume.slice_pixels, volume.depth, ks, size, context)

    def _slice_mask(self, volume: Volume, k: int, result: prop.SliceResult, encoding: MaskEncoding,
                    run: _Run | None = None) -> SliceMask:
        t = time.perf_counter()
        mask = volume.mask_to_input(result.mask)
        out = SliceMask(k, int(mask.shape[0]), int(mask.shape[1]), encoding, encode_mask(mask, encoding),
                        result.iou, result.area)
        if run is not None:
            run.post_s += time.perf_counter() - t
        return out

    def _summary(self, stored: StoredVolume, session: Session, changed: int, run: _Run) -> VolumeSummary:
        slices = session.slices
        voxels = sum(r.area for r in slices.values())
        ks = sorted(slices)
        return VolumeSummary(stored.volume_id, session.segment_id, session.model, session.version, voxels,
                             voxels * stored.volume.voxel_volume_ml, ks[0] if ks else -1, ks[-1] if ks else -1,
                             changed, session.stops, run.timings_ms(), run.reused, len(session.history) - 1)

    # --- model calls ----------------------------------------------------------------------
    async def embedding(self, stored: StoredVolume, pipeline: SamPipeline, k: int, run: _Run) -> Embedding:
        """Slice ``k``'s embedding: from the LRU, else encoded through the backend (and kept)."""
        name, version = pipeline.info.name, pipeline.info.version
        key = (stored.owner, name, version, f"{stored.volume_id}:{k}")
        cached = self._embeddings.get(key)
        if cached is not None:
            run.reused += 1
            self._metrics.volume_event("embedding_reused", name)
            return Embedding(cached.output, cached.frame)
        work.check_current(f"encoding slice {k}")
        t = time.perf_counter()
        predictor = pipeline.predictor
        call, frame = await work.run_in_thread(lambda: predictor.encoder_call(stored.volume.slice_pixels(k)))
        with self._metrics.stage("encoder", name):
            out = await self._backend.infer(call.model, call.inputs, call.outputs, self._timeout)
        embedding = predictor.embedding(out, frame)
        self._embeddings.put(key, embedding.tensor, frame)
        run.embed_s += time.perf_counter() - t
        run.embedded += 1
        self._metrics.volume_event("slice_embedded", name)
        return embedding

    async def decode(self, pipeline: SamPipeline, k: int, embedding: Embedding, prompt, run: _Run) -> prop.Decoded:
        work.check_current(f"the mask decoder (slice {k})")
        t = time.perf_counter()
        predictor = pipeline.predictor
        checked = predictor.check_prompts([prompt], embedding.frame)
        with self._metrics.stage("mask_decoder", pipeline.info.name):
            results = [(indices, await self._backend.infer(call.model, call.inputs, call.outputs, self._timeout))
                       for indices, call in predictor.decoder_calls(embedding, checked)]
        logits, ious = predictor.logits_from(results, checked)

        def finish() -> prop.Decoded:
            mask = predictor.masks(logits, embedding.frame)[0]
            return prop.Decoded(mask, float(np.clip(ious[0], 0.0, 1.0)), logits[0],
                                prop.mask_feature(embedding.tensor, logits[0]))

        decoded = await work.run_in_thread(finish)
        run.decode_s += time.perf_counter() - t
        self._metrics.volume_event("slice_segmented", pipeline.info.name)
        return decoded


class UploadReservation:
    """Bytes held for one upload while it is received (see :meth:`VolumeService.begin_upload`)."""

    def __init__(self, store: VolumeStore, owner: str) -> None:
        self._store, self._owner = store, owner
        self._token: int | None = None
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        """Hold ``nbytes`` in all (RESOURCE_EXHAUSTED when they do not fit)."""
        if nbytes > self.nbytes or self._token is None:
            self._token = self._store.reserve(self._owner, int(nbytes), self._token)
            self.nbytes = int(nbytes)

    def release(self) -> None:
        self._store.release(self._token)
        self._token, self.nbytes = None, 0

    def __enter__(self) -> "UploadReservation":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class _Driver:
    """Runs a :mod:`service.inference.propagation` generator on the gateway's backend,
    yielding its :class:`propagation.SliceDone` events; :attr:`value` is its result."""

    def __init__(self, service: VolumeService, stored: StoredVolume, pipeline: SamPipeline, run: _Run) -> None:
        self._service, self._stored, self._pipeline, self._run = service, stored, pipeline, run
        self.value = None

    async def events(self, steps: Generator) -> AsyncIterator[prop.SliceDone]:
        answer = None
        try:
            while True:
                try:
                    request = steps.send(answer)
                except StopIteration as stop:
                    self.value = stop.value
                    return
                answer = None
                if isinstance(request, prop.Embed):
                    answer = await self._service.embedding(self._stored, self._pipeline, request.slice_index, self._run)
                elif isinstance(request, prop.Decode):
                    answer = await self._service.decode(self._pipeline, request.slice_index, request.embedding,
                                                        request.prompt, self._run)
                elif isinstance(request, prop.SliceDone):
                    yield request
        finally:
            steps.close()
