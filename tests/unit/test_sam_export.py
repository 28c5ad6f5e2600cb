"""The SAM checkpoint path of ``export/sam.py`` with the real ``segment_anything`` classes:
checkpoint errors, entries, and the geometry and selection rules the served model relies on.
No weights are downloaded: checkpoints are written from random initialisations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export import sam
from service.backends.repository import RepositoryEntry, mask_candidates
from service.core.domain import Box, Point, Prompt, PromptKind
from service.core.geometry import SAM_PIXEL_MEAN, Frame, box_from_model, box_to_model, model_input, points_to_model
from service.inference.predictor import ambiguous, choose


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return sam.random_checkpoint("vit_tiny", tmp_path_factory.mktemp("sam") / "tiny.pth")


def test_a_tiny_checkpoint_loads_strictly_into_the_real_classes(tiny):
    net = sam.build("vit_tiny", tiny)
    assert type(net).__module__ == "segment_anything.modeling.sam"
    assert len(net.image_encoder.blocks) == 2 and net.image_encoder.patch_embed.proj.out_channels == 96
    state = torch.load(tiny, weights_only=True)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_wrapped_and_data_parallel_checkpoints_are_accepted(tiny, tmp_path):
    state = torch.load(tiny, weights_only=True)
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, wrapped)
    assert set(sam.load_checkpoint(wrapped, "vit_tiny")) == set(state)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sam.build("vit_b", tmp_path / "sam_vit_b_01ec64.pth")


@pytest.mark.parametrize("cut", [0.5, 0.01])
def test_a_truncated_checkpoint_is_a_clear_error(tiny, tmp_path, cut):
    data = tiny.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ValueError, match=r"is not a readable PyTorch checkpoint \(truncated"):
        sam.load_checkpoint(bad, "vit_tiny")


def test_a_file_of_another_format_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        sam.load_checkpoint(bad, "vit_b")
    other = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], other)
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        sam.load_checkpoint(other, "vit_b")


def _encoder_like(embed_dim: int, blocks: int) -> dict:
    state = {"image_encoder.patch_embed.proj.weight": torch.zeros(embed_dim, 3, 16, 16)}
    state.update({f"image_encoder.blocks.{i}.norm1.weight": torch.zeros(1) for i in range(blocks)})
    return state


@pytest.mark.parametrize("shape, given, hint", [
    ((1024, 24), "vit_b", "pass --variant vit_l"),
    ((1280, 32), "vit_b", "pass --variant vit_h"),
    ((768, 12), "vit_h", "pass --variant vit_b"),
    ((96, 2), "vit_b", "no released SAM variant has this shape"),
])
def test_a_checkpoint_of_another_variant_names_the_right_one(tmp_path, shape, given, hint):
    path = tmp_path / "other.pth"
    torch.save(_encoder_like(*shape), path)
    with pytest.raises(ValueError, match=f"embed dim {shape[0]} with {shape[1]} blocks, not {given}.*{hint}"):
        sam.load_checkpoint(path, given)


def test_a_checkpoint_without_an_image_encoder_is_refused(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"conv.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="not a SAM or MedSAM checkpoint"):
        sam.load_checkpoint(path, "vit_b")


def test_missing_unexpected_and_misshapen_weights_are_named(tiny, tmp_path):
    state = torch.load(tiny, weights_only=True)
    missing = dict(state)
    del missing["mask_decoder.iou_token.weight"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"lacks 1 of the model's \d+ weights \(e\.g\. mask_decoder\.iou_token"):
        sam.build("vit_tiny", tmp_path / "missing.pth")
    extra = {**state, "adapter.weight": torch.zeros(3)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"has 1 weights the model does not \(e\.g\. adapter\.weight"):
        sam.build("vit_tiny", tmp_path / "extra.pth")
    wrong = {**state, "mask_decoder.iou_token.weight": torch.zeros(1, 7)}
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong shape \(e\.g\. mask_decoder\.iou_token\.weight: \(1, 7\)"):
        sam.build("vit_tiny", tmp_path / "wrong.pth")


def test_an_unknown_variant_is_refused(tiny):
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_g'"):
        sam.build("vit_g", tiny)


def test_the_public_variants_are_segment_anythings_builders():
    """Our arguments per variant are those of segment_anything's registered builders."""
    build_sam = sam._segment_anything("build_sam")
    import inspect

    for name in sam.PUBLIC_VARIANTS:
        source = inspect.getsource(build_sam.sam_model_registry[name])
        v = sam.VARIANTS[name]
        assert f"encoder_embed_dim={v.embed_dim}" in source and f"encoder_depth={v.depth}" in source
        assert f"encoder_num_heads={v.num_heads}" in source
        assert f"encoder_global_attn_indexes={list(v.global_attn_indexes)}" in source


def test_entries_carry_the_checkpoint_hash_prompt_kinds_and_candidates():
    digest = "ab" * 32
    enc, dec = sam.sam_entries("sam_vit_b", "vit_b", "sam", digest)
    assert enc.gateway.version == "1-abababab" and enc.gateway.weights_sha256 == digest
    assert enc.gateway.prompt_kinds == {PromptKind.BOX, PromptKind.POINT, PromptKind.MASK}
    assert not enc.gateway.required_prompt_kinds and enc.gateway.preprocessing == "sam"
    assert mask_candidates(dec) == 3 and enc.max_batch_size == 4
    menc, mdec = sam.sam_entries("medsam_vit_b", "vit_b", "medsam", digest)
    assert menc.gateway.required_prompt_kinds == {PromptKind.BOX} and PromptKind.POINT not in menc.gateway.prompt_kinds
    assert mask_candidates(mdec) == 1 and menc.gateway.preprocessing == "medsam"
    for target in ("cpu", "gpu"):  # the Triton entries render and parse back with Triton's own schema
        for entry in (enc, dec):
            back = RepositoryEntry.parse(entry.render(target))
            assert back.gateway.preprocessing == entry.gateway.preprocessing
            assert back.inputs == entry.inputs and back.outputs == entry.outputs
    unbatched, _ = sam.sam_entries("sam_vit_b", "vit_b", "sam", digest, batch=False)
    assert unbatched.max_batch_size == 0 and unbatched.inputs[0].dims == (1, 3, 1024, 1024)


def test_sam_padding_is_the_pixel_mean_so_the_graph_pads_with_zeros():
    pixels = np.random.default_rng(0).random((100, 200), dtype=np.float32)
    tensor, frame = model_input(pixels, 64, "sam")
    assert frame.resized_hw == (32, 64)
    for c, mean in enumerate(SAM_PIXEL_MEAN):
        assert np.allclose(tensor[0, c, 32:], mean)
    plain, _ = model_input(pixels, 64)
    assert np.array_equal(tensor[..., :32, :], plain[..., :32, :]) and not plain[..., 32:, :].any()
    normalised = (tensor - np.array(SAM_PIXEL_MEAN, np.float32).reshape(1, 3, 1, 1)) / 0.229
    assert np.abs(normalised[..., 32:, :]).max() < 1e-6


def test_medsam_stretches_and_maps_each_axis_with_its_own_scale():
    pixels = np.zeros((100, 400), np.float32)
    pixels[:, :200] = 1.0
    tensor, frame = model_input(pixels, 64, "medsam")
    assert frame == Frame(100, 400, 64, stretch=True) and frame.resized_hw == (64, 64)
    assert tensor[0, 0, :, :31].min() == 1.0 and tensor[0, 0, :, 33:].max() == 0.0  # left half stays left half
    assert frame.scales == (64 / 400, 64 / 100)
    with pytest.raises(ValueError, match="scale per axis"):
        _ = frame.scale
    box = Box(40, 10, 240, 60)
    model_box = box_to_model(box, frame)
    assert np.allclose(model_box, [40 * 0.16, 10 * 0.64, 239 * 0.16, 59 * 0.64])
    back = box_from_model(model_box, frame)
    assert (back.x0, back.y0, back.x1, back.y1) == pytest.approx((40, 10, 240, 60), abs=1e-4)
    coords, labels = points_to_model((Point(100.5, 50.5, True), Point(0.5, 0.5, False)), frame)
    assert np.allclose(coords, [[100 * 0.16, 50 * 0.64], [0, 0]]) and labels.tolist() == [1.0, 0.0]


def test_a_lone_click_gets_the_best_candidate_everything_else_the_single_mask_token():
    scores = np.array([0.9, 0.2, 0.7, 0.4], np.float32)
    click = Prompt(points=(Point(5, 5, True),))
    assert ambiguous(click) and choose(click, scores) == 2
    assert choose(Prompt(points=(Point(5, 5, True), Point(9, 9, False))), scores) == 0
    assert choose(Prompt(box=Box(0, 0, 4, 4)), scores) == 0
    assert choose(Prompt(points=(Point(5, 5, True),), mask_input=np.zeros((4, 4), np.float32)), scores) == 0
    assert choose(click, np.array([0.1, 0.3, 0.2, 0.9], np.float32)) == 3


def test_a_decoder_with_another_output_count_is_refused():
    _, dec = sam.sam_entries("x", "vit_b", "sam", "0" * 64)
    from dataclasses import replace

    from service.backends.repository import TensorSpec

    two = replace(dec, outputs=(TensorSpec("low_res_masks", (-1, 2, 256, 256)), TensorSpec("iou_predictions", (-1, 2))))
    with pytest.raises(ValueError, match="mask output with 2 channels"):
        mask_candidates(two)
