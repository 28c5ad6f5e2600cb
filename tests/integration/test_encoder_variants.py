"""The BF16 variant (encoder and its own prompt decoder), exported behind its Dice guard into a
scratch repository, served by a real gateway (embedded: OpenVINO in process) and by a real
tritonserver (python backend running the same runtime module): written with its BF16 decoder
entry, judged with it, listed, selectable per request, close to fp32, and equal through both
paths."""

from __future__ import annotations

import filecmp
import re
import shutil
from collections import Counter

import grpc
import numpy as np
import pytest

from export import encoder_variants
from export.dev_cases import iou, load_cases, reference_box
from export.dice_guard import guard_variant
from export.encoder_variants import VARIANTS, export_encoder_variant
from export.options import ExportOptions
from service.backends.repository import RepositoryEntry, Role, SamModel, discover
from service.inference.predictor import ModelCall, SamPredictor
from medseg_client._generated import segmentation_pb2 as pb
from medseg_client._generated import segmentation_pb2_grpc as pb_grpc
from medseg_client import SegmentationClient, image_from_array
from tests.harness import REPO, GatewayProcess, TritonProcess
from tests.integration.conftest import MAX_REQUEST_BYTES
from tests.integration.test_bad_input import BOX, CASES as BAD_CASES, GOOD_IMAGE

pytestmark = pytest.mark.slow
BF16 = "medsam_lite_bf16"


@pytest.fixture(scope="module")
def bf16_export(model_repository, tmp_path_factory):
    """The BF16 export into a scratch repository, with what its guard ran: the variant
    predictor's entries and its model calls by repository model."""
    repo = tmp_path_factory.mktemp("variants") / "repo"
    for name in ("medsam_lite_encoder", "medsam_lite_decoder"):
        shutil.copytree(model_repository / name, repo / name)
    guarded: dict = {"calls": Counter()}

    def spy(base, variant, evidence, what):
        def run(model, feeds, outputs):
            guarded["calls"][model] += 1
            return variant.call(ModelCall(model, feeds, outputs))

        guarded.update(model=variant.model, items=len(evidence.items), images=evidence.images, kind=evidence.kind)
        return guard_variant(base, SamPredictor(variant.model, run), evidence, what)

    # The guard on 4 of the images shipped with pydicom (12 prompts), as on a bare clone: the
    # dev-case guard needs all 40 cases (on a handful, per-case noise of |delta Dice| up to 0.04
    # exceeds the 0.005 mean limit), which `make models` runs before the suite, and the same
    # export function and writer run either way (tests/integration/test_bare_clone_export.py
    # has the shipped-image path end to end, tests/unit/test_dice_guard.py both deciders).
    no_cases = tmp_path_factory.mktemp("no-dev-cases")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(encoder_variants, "guard_variant", spy)
        written = export_encoder_variant(VARIANTS[BF16], ExportOptions(repository=repo, cache_dir=REPO / ".cache"),
                                         no_cases, limit=4)
    return repo, guarded, written


@pytest.fixture(scope="module")
def variant_repository(bf16_export):
    return bf16_export[0]


def test_the_bf16_variant_is_written_with_its_own_bf16_decoder(bf16_export):
    repo, _, written = bf16_export
    encoder = RepositoryEntry.read(repo / f"{BF16}_encoder")
    decoder = RepositoryEntry.read(repo / f"{BF16}_decoder")
    fp32_decoder = RepositoryEntry.read(repo / "medsam_lite_decoder")
    assert encoder.gateway.decoder == decoder.name == f"{BF16}_decoder"
    assert (decoder.gateway.model, decoder.gateway.role) == (BF16, Role.PROMPT_DECODER)
    assert (decoder.runtime.runtime, decoder.runtime.precision) == ("openvino", "bf16")
    assert (encoder.runtime.runtime, encoder.runtime.precision) == ("openvino", "bf16")
    assert decoder.gateway.version == fp32_decoder.gateway.version + "-bf16"
    assert decoder.gateway.memory_bytes > 0 and encoder.gateway.memory_bytes > 0  # measured at export
    # a copy of the fp32 decoder's file, with the python-backend files beside it for Triton
    assert filecmp.cmp(decoder.onnx_path(), fp32_decoder.onnx_path(), shallow=False)
    assert {"model.onnx", "model.py", "medseg_runtimes.py"} <= {p.name for p in (repo / decoder.name / "1").iterdir()}
    assert not list(repo.rglob("*.tmp.onnx"))
    assert {encoder.onnx_path(), decoder.onnx_path(), repo / encoder.name / "config.pbtxt",
            repo / decoder.name / "config.pbtxt"} == set(written)
    model = discover(repo, "medsam_lite")[BF16]
    assert isinstance(model, SamModel) and model.decoder.name == decoder.name


def test_the_guard_judged_the_bf16_encoder_and_decoder_together(bf16_export):
    _, guarded, _ = bf16_export
    model = guarded["model"]
    assert model.encoder.name == f"{BF16}_encoder" and model.decoder.name == f"{BF16}_decoder"
    assert model.decoder.runtime.runtime == "openvino" and model.decoder.runtime.precision == "bf16"
    images, prompts = guarded["images"], guarded["items"]
    assert guarded["kind"] == "shipped" and (images, prompts) == (4, 12)
    # one encoder run per image, one decoder run per prompt, both on the variant's own entries
    assert guarded["calls"] == {f"{BF16}_encoder": images, f"{BF16}_decoder": prompts}


@pytest.fixture(scope="module")
def variant_gateway(variant_repository, tmp_path_factory):
    # The limits of the shared gateway (tests/integration/conftest.py), so its bad-input cases apply.
    # --default-model medsam_lite pins the old default (auto would choose by speed): calls naming
    # no model get fp32 here, the reference the BF16 answers are compared with.
    proc = GatewayProcess(tmp_path_factory.mktemp("variant-gw"), "--model-repository", str(variant_repository),
                          "--max-request-bytes", str(MAX_REQUEST_BYTES), "--max-prompts", "8",
                          "--default-model", "medsam_lite")
    try:  # a start or warm-up that fails still stops the process
        proc.start().wait_serving()
        yield proc
    finally:
        proc.stop()


def _cases(shared_data, n: int = 6):
    for case in load_cases(shared_data / "dev")[::40 // n][:n]:
        b = reference_box(case.mask)
        yield case, image_from_array(case.image), [(b.x0, b.y0, b.x1, b.y1)]


def test_the_gateway_loads_each_entry_once_the_bf16_decoder_on_openvino(variant_gateway, variant_repository):
    loaded = re.findall(r"loaded (\S+) on (ONNX Runtime|OpenVINO)", variant_gateway.log())
    assert Counter(name for name, _ in loaded) == {p.parent.name: 1 for p in variant_repository.glob("*/config.pbtxt")}
    assert dict(loaded) == {"medsam_lite_encoder": "ONNX Runtime", "medsam_lite_decoder": "ONNX Runtime",
                            f"{BF16}_encoder": "OpenVINO", f"{BF16}_decoder": "OpenVINO"}


def test_bf16_variant_is_listed_with_the_fp32_model_still_the_default(variant_gateway):
    with SegmentationClient(variant_gateway.target, timeout=60) as c:
        models = {m.name: m for m in c.list_models()}
    assert {"medsam_lite", BF16} <= set(models)
    assert models["medsam_lite"].is_default and not models[BF16].is_default
    assert models[BF16].version.endswith("-bf16") and "BF16" in models[BF16].description


def test_bf16_masks_are_close_to_fp32_on_dev_cases(variant_gateway, shared_data):
    ious, dice_fp32, dice_bf16 = [], [], []
    with SegmentationClient(variant_gateway.target, timeout=60) as c:
        for case, image, box in _cases(shared_data):
            fp32 = c.segment(image=image, boxes=box).masks[0]
            bf16 = c.segment(image=image, boxes=box, model=BF16)
            assert bf16.model_name == BF16
            ious.append(iou(bf16.masks[0], fp32))
            for masks, out in ((fp32, dice_fp32), (bf16.masks[0], dice_bf16)):
                out.append(2 * np.logical_and(masks, case.mask).sum() / (masks.sum() + case.mask.sum()))
    print(f"bf16 vs fp32 mask IoU: mean {np.mean(ious):.4f}, worst {min(ious):.4f}; "
          f"Dice fp32 {np.mean(dice_fp32):.4f} bf16 {np.mean(dice_bf16):.4f}")
    assert np.mean(ious) >= 0.9  # measured 0.96 (small structures flip boundary pixels)
    assert np.mean(dice_fp32) - np.mean(dice_bf16) <= 0.02  # 6 cases; the 40-case guard holds 0.005


def test_triton_serves_the_bf16_variant_like_the_embedded_backend(variant_repository, variant_gateway,
                                                                   shared_data, tmp_path):
    server, gw = TritonProcess(tmp_path / "triton", repository=variant_repository), None
    try:  # started inside: whatever fails, both are stopped by PID
        server.start()  # may move to fresh ports if one was taken: build the gateway's target after
        gw = GatewayProcess(tmp_path / "tgw", "--model-repository", str(variant_repository), "--backend", "triton",
                            "--triton-url", server.grpc_target, "--default-model", "medsam_lite")
        gw.start().wait_serving()
        with SegmentationClient(variant_gateway.target, timeout=60) as embedded, \
                SegmentationClient(gw.target, timeout=120) as via_triton:
            for _, image, box in _cases(shared_data, 3):
                want = embedded.segment(image=image, boxes=box, model=BF16)
                got = via_triton.segment(image=image, boxes=box, model=BF16)
                assert got.model_version == want.model_version
                assert iou(got.masks[0], want.masks[0]) >= 0.999
    finally:
        try:
            if gw is not None:
                gw.stop()
        finally:
            server.stop()


@pytest.mark.parametrize("name", sorted(set(BAD_CASES) - {"unknown_model"}))
def test_bad_requests_to_the_bf16_model_get_their_status_and_it_keeps_serving(variant_gateway, name):
    request, code = BAD_CASES[name]
    aimed = pb.SegmentRequest()
    aimed.CopyFrom(request)
    aimed.model = BF16
    with grpc.insecure_channel(variant_gateway.target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.SegmentationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Segment(aimed, timeout=30)
        assert info.value.code() == code, info.value.details()
        good = stub.Segment(pb.SegmentRequest(image=GOOD_IMAGE, prompts=[pb.Prompt(box=BOX)], model=BF16), timeout=30)
        assert len(good.masks) == 1 and good.model.name == BF16
    assert "Traceback" not in variant_gateway.log()
