"""service.edge.convert: the only module of the servicer's side that reads and builds
medseg.v1 messages (requests, responses, the audit fields, the tolerant request parsers)."""

from __future__ import annotations

import pytest

from medseg_client._generated import segmentation_pb2 as pb
from service.core import errors
from service.core.domain import ModelInfo, PromptKind
from service.edge import convert as api

RAW = pb.Image(raw=pb.RawArray(dtype=pb.DTYPE_UINT8, shape=[8, 10], data=bytes(80)))
BOX = pb.Prompt(box=pb.Box(x0=1, y0=1, x1=5, y1=5))


def test_request_summary_reads_the_model_as_sent_the_prompt_count_and_the_raw_size():
    assert api.request_summary(pb.SegmentRequest(image=RAW, prompts=[BOX, BOX])) == \
        api.RequestSummary(model="", prompts=2, image_size=(8, 10))
    assert api.request_summary(pb.SegmentRequest(model="other", image_id="abc", prompts=[BOX])) == \
        api.RequestSummary(model="other", prompts=1, image_size=None)
    encoded = pb.Image(encoded=b"\x89PNG")
    assert api.request_summary(pb.EmbedImageRequest(model="m", image=encoded)) == api.RequestSummary(model="m")
    assert api.request_summary(pb.EmbedImageRequest(image=RAW)) == api.RequestSummary(model="", image_size=(8, 10))
    # methods that name no model, and bytes that were no message
    assert api.request_summary(pb.ListModelsRequest()) == api.RequestSummary(model=None)
    assert api.request_summary(api.Undecodable("medseg.v1.SegmentRequest")) == api.RequestSummary(model=None)


def test_the_request_takes_the_resolved_model_not_the_field():
    request = api.segment_request_from_proto(pb.SegmentRequest(image=RAW, prompts=[BOX]), "medsam_lite")
    assert request.model == "medsam_lite" and len(request.prompts) == 1 and request.image is not None


def test_embed_needs_an_image():
    with pytest.raises(errors.InvalidImage):
        api.embed_image_from_proto(pb.EmbedImageRequest(model="m"))
    assert api.embed_image_from_proto(pb.EmbedImageRequest(image=RAW)).raw.shape == (8, 10)


def test_response_size_and_list_models_response():
    assert api.response_size(pb.SegmentResponse(height=8, width=10)) == (8, 10)
    assert api.response_size(pb.EmbedImageResponse(height=3, width=4)) == (3, 4)
    assert api.response_size(pb.SegmentResponse()) is None
    assert api.response_size(pb.ListModelsResponse()) is None
    box = frozenset({PromptKind.BOX})
    reply = api.list_models_response(iter([ModelInfo("a", "1", 256, box, box, is_default=True)]))
    assert [(m.name, m.is_default, list(m.prompt_kinds)) for m in reply.models] == [("a", True, [pb.PROMPT_KIND_BOX])]
    assert reply.models[0].context_slices == 0
    volume_only = api.list_models_response(iter([ModelInfo("u", "1", 128, frozenset(), frozenset(), context_slices=2)]))
    assert volume_only.models[0].context_slices == 2


def test_codecs_cover_every_method_and_never_raise_on_bad_bytes():
    codecs = api.segmentation_codecs()
    assert set(codecs) == {m.name for m in pb.DESCRIPTOR.services_by_name["Segmentation"].methods}
    parse, serialize = codecs["Segment"]
    message = pb.SegmentRequest(model="m", image=RAW)
    assert parse(message.SerializeToString()) == message
    bad = parse(b"\xff\xff\xff\xff\x0f not protobuf")
    assert isinstance(bad, api.Undecodable) and bad.type_name == "medseg.v1.SegmentRequest"
    assert pb.SegmentResponse.FromString(serialize(pb.SegmentResponse(height=2))).height == 2
    assert api.SERVICE_NAME == "medseg.v1.Segmentation"
