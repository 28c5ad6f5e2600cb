"""The ``medseg.v1.Volumes`` servicer: upload a volume, segment it in 3-D (streamed), refine,
undo, fetch the mask, delete.

Every method runs inside the same guard as the Segmentation methods (:mod:`service.edge.servicer`:
request id, auth, model resolution and authorisation, admission, deadline, the error mapping,
metrics, one audit line with the volume's shape but never its content), through the decorator
of its shape: :func:`rpc` (unary), :func:`rpc_stream` (a streamed answer: each slice is written
as soon as the volume service yields it, the summary last) and :func:`rpc_client_stream` (the
upload). Calls that run models (SegmentVolume, RefineSegment, UndoSegment) take an admission
slot, held while their stream runs; UploadVolume, GetSegmentMask and DeleteVolume do not.

Volumes and segments belong to the call's cache scope (``--cache-scope``, as cached images do):
another caller's volume_id answers NOT_FOUND. Messages are read and built only in
:mod:`service.edge.volume_convert`; the work is :attr:`Gateway.volumes`
(:class:`service.inference.volumes.VolumeService`).
"""

from __future__ import annotations

import grpc

from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from service.edge import volume_convert
from service.edge.servicer import Call, GuardedServicer, rpc, rpc_client_stream, rpc_stream
from service.core.errors import FailedPrecondition
from service.inference import work
from service.inference.studies import NO_PACS
from service.inference.volumes import VolumeService


class VolumesServicer(GuardedServicer, vpb_grpc.VolumesServicer):
    codecs = staticmethod(volume_convert.volume_codecs)
    summarize = staticmethod(volume_convert.request_summary)
    response_size = staticmethod(volume_convert.response_size)

    @property
    def volumes(self) -> VolumeService:
        return self.gateway.volumes

    def _owner(self, call: Call) -> str:
        return self._cache_scope(call)

    def _describe(self, volume_id: str, call: Call) -> None:
        """The volume's shape into the audit line; NOT_FOUND (unknown, expired or another
        caller's volume) before the call takes an admission slot."""
        call.describe(volume_convert.info_shape(self.volumes.info(volume_id, self._owner(call))))

    # --- before admission ------------------------------------------------------------------
    def _prepare_segment(self, request, call: Call):
        req = volume_convert.segment_request_from_proto(request, call.model)
        self.gateway.pipeline(call.model)  # unknown model: NOT_FOUND; still loading: UNAVAILABLE
        self._describe(req.volume_id, call)
        return req, None

    def _authorize_segment(self, volume_id: str, segment_id: str, call: Call) -> None:
        """A call on an existing segment may use the model that made it (with tenant or shared
        cache scopes another caller sees the segment: the token must still name the model)."""
        self._describe(volume_id, call)
        model = self.volumes.segment_model(volume_id, segment_id, self._owner(call))
        self.authenticator.authorize(call.principal, model)

    def _prepare_refine(self, request, call: Call):
        req = volume_convert.refine_request_from_proto(request)
        self._authorize_segment(req.volume_id, req.segment_id, call)
        return req, None

    def _prepare_segment_ref(self, request, call: Call):
        ref = volume_convert.segment_ref_from_proto(request)
        self._authorize_segment(ref.volume_id, ref.segment_id, call)
        return ref, None

    # --- the methods -----------------------------------------------------------------------
    @rpc_client_stream("UploadVolume")
    async def UploadVolume(self, requests, context, call: Call):
        """Header, then file parts; the bounds are checked before any part is read (a declared
        total_bytes) and again as each part arrives, so an upload over them ends as soon as it
        crosses them (RESOURCE_EXHAUSTED)."""
        owner = self._owner(call)
        upload = volume_convert.UploadAssembler(max_files=self.gateway.settings.max_series_files)
        try:
            with self.volumes.begin_upload(owner) as reservation:  # concurrent uploads share the bounds
                async for message in requests:
                    check = upload.feed(message)
                    if check is not None:
                        reservation.grow(check)
                    call.describe(upload.shape)
                source = upload.finish()
                del upload
                info = await self.volumes.upload(source, owner, reservation)
        except BaseException:
            # a refused or cut upload: its parts are freed now; give their heap pages back
            # (a stored upload does this in VolumeService.upload)
            upload = source = None  # noqa: F841 - dropped before the trim, not kept by the traceback
            work.release_free_heap()
            raise
        return volume_convert.volume_info_to_proto(info)

    @rpc_stream("SegmentVolume", prepare=_prepare_segment, to_message=volume_convert.stream_item_to_proto)
    def SegmentVolume(self, req, context, call: Call):
        return self.volumes.segment(req, self._owner(call))

    @rpc_stream("RefineSegment", prepare=_prepare_refine, to_message=volume_convert.stream_item_to_proto)
    def RefineSegment(self, req, context, call: Call):
        return self.volumes.refine(req, self._owner(call))

    @rpc_stream("UndoSegment", prepare=_prepare_segment_ref, to_message=volume_convert.stream_item_to_proto)
    def UndoSegment(self, ref, context, call: Call):
        return self.volumes.undo(ref.volume_id, ref.segment_id, self._owner(call), ref.encoding)

    def _prepare_study(self, request, call: Call):
        req = volume_convert.study_request_from_proto(request, call.model)
        self.gateway.pipeline(call.model)  # unknown model: NOT_FOUND; still loading: UNAVAILABLE
        if not self.gateway.studies.configured:
            raise FailedPrecondition(NO_PACS)
        return req, None

    @rpc("GetSegmentMask", admitted=False, prepare=_prepare_segment_ref)
    async def GetSegmentMask(self, ref, context, call: Call):
        result = await self.volumes.mask(ref.volume_id, ref.segment_id, self._owner(call), ref.encoding,
                                         dicom_seg=ref.dicom_seg)
        return volume_convert.mask_response_to_proto(result)

    @rpc("SegmentStudy", prepare=_prepare_study)
    async def SegmentStudy(self, req, context, call: Call):
        """Retrieve (WADO-RS), segment, write the SEG, store it (STOW-RS) when asked. Holds an
        admission slot for the whole call; the audit line gets the series' shape, never its
        UIDs."""
        result = await self.gateway.studies.segment_study(req, self._owner(call))
        call.describe(volume_convert.info_shape(result.volume))
        return volume_convert.study_response_to_proto(result, req.return_dicom_seg)

    @rpc("DeleteVolume", admitted=False)
    async def DeleteVolume(self, request, context, call: Call):
        volume_id = volume_convert.delete_request_from_proto(request)
        return volume_convert.delete_response(self.volumes.delete(volume_id, self._owner(call)))

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Register like the generated ``add_VolumesServicer_to_server``, with request parsers
        that never raise and the streaming shapes of ``volumes.proto``."""
        self._register(server, volume_convert.SERVICE_NAME, volume_convert.method_kinds())
