"""The Volumes servicer and the streaming forms of the rpc decorator (service/edge/servicer.py,
volume_servicer.py, intake.py), in process over real gRPC with a fake volume service: slices
are written as the service yields them, the summary last, inside one admission slot; an error
mid-stream ends the call with its status; a client cancel reaches the service's iterator; an
upload is checked against the bounds as its parts arrive, counted per connection and cut when
it stalls; auth, authorisation, the owner (cache scope), health, reflection and the audit line."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import volumes_pb2 as vpb
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc
from service.core import errors
from service.core.domain import MaskEncoding, Window
from service.core.mask_codec import encode_mask
from service.edge import volume_convert
from service.edge.servicer import GuardedServicer
from service.inference import work
from service.inference.volumes import SegmentMaskResult, SliceMask, VolumeInfo, VolumeSummary
from service.settings import Settings
from tests.unit.test_server_guard import AUTH, MODELS, FakeGateway, _run, tokens_file  # noqa: F401

BOX = pb.Box(x0=2, y0=2, x1=10, y1=10)
SEGMENT = vpb.SegmentVolumeRequest(volume_id="vol-1", slice_index=3, box=BOX)
INFO = VolumeInfo("vol-1", 6, 16, 20, (1.0, 1.0, 2.0), Window(40, 400), "request", "raw", 1920, 1800.0)


def _slice(k: int, encoding: MaskEncoding = MaskEncoding.BITS) -> SliceMask:
    mask = np.zeros((16, 20), bool)
    mask[k:k + 4, 2:9] = True
    return SliceMask(k, 16, 20, encoding, encode_mask(mask, encoding), 0.8, int(mask.sum()))


def _summary(changed: int = 3) -> VolumeSummary:
    return VolumeSummary("vol-1", "seg-1", "medsam_lite", "1", 84, 0.168, 2, 4, changed, ("range end",))


class FakeVolumes:
    """The VolumeService signatures, scripted: ``script`` is what segment() yields, in order;
    an asyncio.Event in it is awaited, an exception raised."""

    def __init__(self, max_bytes: int = 1 << 20) -> None:
        self.max_bytes = max_bytes
        self.reserved: list[int] = []
        self.owners: list[str] = []
        self.sources = []
        self.script: list = [_slice(2), _slice(3), _slice(4), _summary()]
        self.events: list[str] = []   # what the service's iterator saw
        self.admitted: list[bool] = []

    def begin_upload(self, owner: str):
        fake = self

        class Reservation:
            nbytes = 0

            def grow(self, declared_bytes: int) -> None:
                fake.reserved.append(declared_bytes)
                if declared_bytes > fake.max_bytes:
                    raise errors.PayloadTooLarge(f"the upload is over {fake.max_bytes} bytes (--max-volume-bytes)")

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                pass

        return Reservation()

    async def upload(self, source, owner: str, reservation=None) -> VolumeInfo:
        self.sources.append(source)
        self.owners.append(owner)
        return INFO

    def segment_model(self, volume_id: str, segment_id: str, owner: str) -> str:
        self.info(volume_id, owner)
        return "medsam_lite"

    def info(self, volume_id: str, owner: str) -> VolumeInfo:
        self.owners.append(owner)
        if volume_id != "vol-1":
            raise errors.NotFound(f"volume {errors.shorten(volume_id)} is unknown or expired: upload it again")
        return INFO

    def delete(self, volume_id: str, owner: str) -> bool:
        return volume_id == "vol-1"

    async def _stream(self):
        self.admitted.append(work.current() is not None)
        try:
            for step in self.script:
                if isinstance(step, asyncio.Event):
                    await step.wait()
                elif isinstance(step, BaseException):
                    raise step
                else:
                    self.events.append(f"yield {type(step).__name__}")
                    yield step
        except asyncio.CancelledError:
            self.events.append("cancelled")
            raise
        except GeneratorExit:
            self.events.append("closed")
            raise
        finally:
            self.events.append("finally")

    def segment(self, request, owner: str):
        self.owners.append(owner)
        self.requests = getattr(self, "requests", []) + [request]
        return self._stream()

    def refine(self, request, owner: str):
        return self.segment(request, owner)

    def undo(self, volume_id, segment_id, owner, encoding=MaskEncoding.COCO_RLE):
        return self.segment((volume_id, segment_id, encoding), owner)

    async def mask(self, volume_id, segment_id, owner, encoding=MaskEncoding.COCO_RLE, *, nifti=True, slices=True,
                   dicom_seg=None) -> SegmentMaskResult:
        self.last_seg_options = dicom_seg
        return SegmentMaskResult(_summary(0), b"\x1f\x8bnii", (_slice(2, encoding),))


class VolumeGateway(FakeGateway):
    def __init__(self, settings: Settings, volumes: FakeVolumes | None = None) -> None:
        super().__init__(settings)
        self.volumes = volumes or FakeVolumes()

    def pipeline(self, model: str):
        if model not in MODELS:
            raise errors.ModelNotFound(f"model {errors.shorten(model)} is not served here")
        return MODELS[model]


def _running(gateway) -> float:
    return gateway.metrics.registry.get_sample_value("medseg_admission_running")


async def _collect(call) -> tuple[list, grpc.StatusCode]:
    items = []
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            items.append(message)
    except grpc.aio.AioRpcError as exc:
        return items, exc.code()
    return items, grpc.StatusCode.OK


def test_slices_stream_as_the_service_yields_them_inside_one_admission_slot(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)
    release = asyncio.Event()
    gateway.volumes.script = [_slice(2), release, _slice(3), _summary(2)]

    async def body(channel):
        call = vpb_grpc.VolumesStub(channel).SegmentVolume(SEGMENT, timeout=10)
        first = await call.read()  # arrives while the service still waits
        during = _running(gateway)
        release.set()
        rest, code = await _collect(call)
        return first, during, rest, code, _running(gateway)

    first, during, rest, code, after = _run(settings, gateway, body)
    assert code == grpc.StatusCode.OK and first.slice.slice_index == 2 and during == 1 and after == 0
    assert [m.WhichOneof("item") for m in rest] == ["slice", "summary"]
    assert rest[-1].summary.segment_id == "seg-1" and rest[0].slice.mask.height == 16
    assert gateway.volumes.admitted == [True]
    assert gateway.volumes.requests[0].model == "medsam_lite" and gateway.volumes.requests[0].slice_index == 3
    (line,) = [line for line in audit_lines if line["method"] == "SegmentVolume"]
    assert (line["status"], line["model"], line["prompts"]) == ("OK", "medsam_lite", 1)
    assert (line["image_depth"], line["image_height"], line["image_width"]) == (6, 16, 20)


def test_an_error_mid_stream_ends_the_call_with_its_status_after_the_slices_sent(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)
    gateway.volumes.script = [_slice(2), errors.InvalidPrompt("box (2, 2, 10, 10) lies outside the slice")]

    async def body(channel):
        call = vpb_grpc.VolumesStub(channel).SegmentVolume(SEGMENT, timeout=10)
        items, code = await _collect(call)
        return items, code, await call.details(), _running(gateway)

    items, code, details, after = _run(settings, gateway, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "outside the slice" in details
    assert len(items) == 1 and items[0].slice.slice_index == 2 and after == 0
    assert [line["status"] for line in audit_lines if line["method"] == "SegmentVolume"] == ["INVALID_ARGUMENT"]


def test_a_client_cancel_reaches_the_services_iterator_and_the_next_call_succeeds(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)
    never = asyncio.Event()
    gateway.volumes.script = [_slice(2), never, _slice(3), _summary()]

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        call = stub.SegmentVolume(SEGMENT, timeout=10)
        await call.read()
        call.cancel()
        deadline = time.monotonic() + 3
        while "finally" not in gateway.volumes.events and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        events = list(gateway.volumes.events)
        gateway.volumes.script = [_slice(2), _summary(1)]
        _, code = await _collect(stub.SegmentVolume(SEGMENT, timeout=10))
        return events, code, _running(gateway)

    events, code, after = _run(settings, gateway, body)
    assert events == ["yield SliceMask", "cancelled", "finally"]
    assert code == grpc.StatusCode.OK and after == 0
    assert [line["status"] for line in audit_lines if line["method"] == "SegmentVolume"] == ["CANCELLED", "OK"]


def test_a_cancel_while_writing_is_thrown_into_the_stream_at_its_yield():
    """The relay is writing (the service's iterator is suspended at its yield) when the call is
    cancelled: the iterator gets the CancelledError there and stops."""
    volumes = FakeVolumes()
    volumes.script = [_slice(2), _slice(3), _summary()]

    class Stuck:
        async def write(self, payload):
            await asyncio.sleep(30)

    async def main():
        servicer = GuardedServicer(VolumeGateway(Settings(port=0), volumes))
        task = asyncio.ensure_future(servicer._relay(volumes._stream(), Stuck(),
                                                     volume_convert.stream_item_to_proto, lambda m: b"x"))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert volumes.events == ["yield SliceMask", "cancelled", "finally"]


def test_unknown_volume_and_model_are_not_found_before_admission():
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        unknown_volume = vpb.SegmentVolumeRequest(volume_id="nope", slice_index=1, box=BOX)
        unknown_model = vpb.SegmentVolumeRequest(volume_id="vol-1", model="nope", slice_index=1, box=BOX)
        undo = vpb.UndoSegmentRequest(volume_id="nope", segment_id="s")
        return [(await _collect(stub.SegmentVolume(unknown_volume, timeout=5)))[1],
                (await _collect(stub.SegmentVolume(unknown_model, timeout=5)))[1],
                (await _collect(stub.UndoSegment(undo, timeout=5)))[1],
                (await _collect(stub.SegmentVolume(vpb.SegmentVolumeRequest(volume_id="vol-1", slice_index=1),
                                                   timeout=5)))[1]]

    codes = _run(settings, gateway, body)
    assert codes == [grpc.StatusCode.NOT_FOUND] * 3 + [grpc.StatusCode.INVALID_ARGUMENT]
    assert gateway.volumes.admitted == []  # none of them reached the service's stream


def test_refine_undo_mask_and_delete(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        gateway.volumes.script = [_slice(5), _summary(1)]
        refine = vpb.RefineSegmentRequest(volume_id="vol-1", segment_id="seg-1",
                                          erase=vpb.SliceRange(first=5, last=5), encoding=pb.MASK_ENCODING_PNG)
        refined = await _collect(stub.RefineSegment(refine, timeout=5))
        gateway.volumes.script = [_slice(5), _summary(1)]
        undone = await _collect(stub.UndoSegment(vpb.UndoSegmentRequest(volume_id="vol-1", segment_id="seg-1"),
                                                 timeout=5))
        mask = await stub.GetSegmentMask(vpb.GetSegmentMaskRequest(volume_id="vol-1", segment_id="seg-1",
                                                                   encoding=pb.MASK_ENCODING_PNG), timeout=5)
        deleted = await stub.DeleteVolume(vpb.DeleteVolumeRequest(volume_id="vol-1"), timeout=5)
        missing = await stub.DeleteVolume(vpb.DeleteVolumeRequest(volume_id="nope"), timeout=5)
        return refined, undone, mask, deleted.deleted, missing.deleted

    refined, undone, mask, deleted, missing = _run(settings, gateway, body)
    assert refined[1] == undone[1] == grpc.StatusCode.OK and len(refined[0]) == len(undone[0]) == 2
    first_request, undo_request = gateway.volumes.requests
    assert (first_request.erase_first, first_request.erase_last, first_request.encoding) == (5, 5, MaskEncoding.PNG)
    assert undo_request == ("vol-1", "seg-1", MaskEncoding.BITS)
    assert mask.nifti_gz == b"\x1f\x8bnii" and mask.slices[0].mask.encoding == pb.MASK_ENCODING_PNG
    assert (deleted, missing) == (True, False)
    assert gateway.volumes.admitted == [True, True]  # Refine and Undo run models: admitted
    statuses = {line["method"]: line["status"] for line in audit_lines}
    assert statuses == {"RefineSegment": "OK", "UndoSegment": "OK", "GetSegmentMask": "OK", "DeleteVolume": "OK"}


def _upload(*messages, pause_s: float = 0.0, stall_after: int | None = None):
    async def requests():
        for i, message in enumerate(messages):
            if stall_after is not None and i == stall_after:
                await asyncio.sleep(30)
            yield message
            if pause_s:
                await asyncio.sleep(pause_s)

    return requests()


HEADER = vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_NIFTI, total_bytes=6))
PARTS = [vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=b"abc")),
         vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=b"def", end_of_file=True))]


def test_an_upload_is_checked_as_its_parts_arrive_and_gives_the_volume_info(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        info = await stub.UploadVolume(_upload(HEADER, *PARTS), timeout=5)
        big = vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_NIFTI, total_bytes=1 << 30))
        over_declared = await _code_of(stub.UploadVolume(_upload(big, *PARTS), timeout=5))
        gateway.volumes.max_bytes = 4
        undeclared = vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_NIFTI))
        over_received = await _code_of(stub.UploadVolume(_upload(undeclared, *PARTS), timeout=5))
        empty = await _code_of(stub.UploadVolume(_upload(), timeout=5))
        return info, over_declared, over_received, empty

    info, over_declared, over_received, empty = _run(settings, gateway, body)
    assert (info.volume_id, info.depth, info.height, info.width) == ("vol-1", 6, 16, 20)
    assert gateway.volumes.sources[0].data == b"abcdef" and gateway.volumes.sources[0].format == "nifti"
    assert over_declared == over_received == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert empty == grpc.StatusCode.INVALID_ARGUMENT
    # declared total, then each part; refused before any part of the big one; then 3, 6 > 4
    assert gateway.volumes.reserved == [6, 3, 6, 1 << 30, 3, 6]
    lines = [line for line in audit_lines if line["method"] == "UploadVolume"]
    assert [line["status"] for line in lines] == ["OK", "RESOURCE_EXHAUSTED", "RESOURCE_EXHAUSTED",
                                                 "INVALID_ARGUMENT"]
    assert (lines[0]["image_depth"], lines[0]["image_height"], lines[0]["image_width"]) == (6, 16, 20)


async def _code_of(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_a_slow_but_steady_upload_passes_a_stalled_one_is_cut_and_uploads_count_per_connection():
    settings = Settings(port=0, request_receive_timeout_s=0.6, max_rpcs_per_connection=2)
    gateway = VolumeGateway(settings)

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        start = time.monotonic()
        steady = await _code_of(stub.UploadVolume(_upload(HEADER, *PARTS, pause_s=0.35), timeout=10))
        steady_s = time.monotonic() - start
        start = time.monotonic()
        stalled = await _code_of(stub.UploadVolume(_upload(HEADER, *PARTS, stall_after=1), timeout=10))
        stalled_s = time.monotonic() - start
        held = [asyncio.ensure_future(_code_of(stub.UploadVolume(_upload(HEADER, *PARTS, stall_after=1),
                                                                 timeout=10))) for _ in range(2)]
        await asyncio.sleep(0.2)
        third = await _code_of(stub.UploadVolume(_upload(HEADER, *PARTS), timeout=10))
        return steady, steady_s, stalled, stalled_s, third, await asyncio.gather(*held)

    steady, steady_s, stalled, stalled_s, third, held = _run(settings, gateway, body)
    assert steady == grpc.StatusCode.OK and steady_s > 0.6  # longer in all than one message may take
    assert stalled == grpc.StatusCode.DEADLINE_EXCEEDED and stalled_s < 3
    assert third == grpc.StatusCode.RESOURCE_EXHAUSTED  # the connection's share is held by two uploads
    assert held == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2


def test_auth_authorisation_and_the_owner_are_those_of_the_call(tokens_file):  # noqa: F811
    settings = Settings(port=0, auth_tokens_file=str(tokens_file))
    gateway = VolumeGateway(settings)

    async def body(channel):
        stub = vpb_grpc.VolumesStub(channel)
        no_token = await _code_of(stub.UploadVolume(_upload(HEADER, *PARTS), timeout=5))
        ok = await _code_of(stub.UploadVolume(_upload(HEADER, *PARTS), timeout=5, metadata=AUTH))
        forbidden = vpb.SegmentVolumeRequest(volume_id="vol-1", model="other", slice_index=1, box=BOX)
        denied = (await _collect(stub.SegmentVolume(forbidden, timeout=5, metadata=AUTH)))[1]
        gateway.volumes.script = [_summary(0)]
        allowed = (await _collect(stub.SegmentVolume(SEGMENT, timeout=5, metadata=AUTH)))[1]
        return no_token, ok, denied, allowed

    no_token, ok, denied, allowed = _run(settings, gateway, body)
    assert (no_token, ok, denied, allowed) == (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.OK,
                                               grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK)
    assert set(gateway.volumes.owners) == {"caller:pacs-router"}


def test_undecodable_requests_health_and_reflection():
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)

    async def body(channel):
        garbage = channel.unary_stream("/medseg.v1.Volumes/SegmentVolume")(b"\xff\xff\xff", timeout=5)
        _, code = await _collect(garbage)
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="medseg.v1.Volumes"), timeout=5)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        names = [s.name async for r in reflection for s in r.list_services_response.service]
        return code, health.status, names

    code, health, names = _run(settings, gateway, body)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert {"medseg.v1.Segmentation", "medseg.v1.Volumes"} <= set(names)


def test_the_deadline_bounds_the_whole_stream_and_stops_the_service(audit_lines):
    settings = Settings(port=0)
    gateway = VolumeGateway(settings)
    gateway.volumes.script = [_slice(2), asyncio.Event(), _summary()]

    async def body(channel):
        start = time.monotonic()
        items, code = await _collect(vpb_grpc.VolumesStub(channel).SegmentVolume(SEGMENT, timeout=1.0))
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 3
        while "finally" not in gateway.volumes.events and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return items, code, elapsed, _running(gateway)

    items, code, elapsed, after = _run(settings, gateway, body)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and len(items) == 1 and elapsed < 2.0 and after == 0
    assert gateway.volumes.events == ["yield SliceMask", "cancelled", "finally"]
    assert [line["status"] for line in audit_lines if line["method"] == "SegmentVolume"] == ["DEADLINE_EXCEEDED"]
