"""The Dice guard every faster encoder variant passes before it is written."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from export.dice_guard import check_drop
from export.encoder_variants import VARIANTS, export_encoder_variant
from export.options import ExportOptions
from tests.harness import ensure_models


def test_a_drop_within_the_limit_passes_and_one_beyond_it_raises():
    base = [0.80, 0.60]
    assert check_drop(base, [0.80, 0.595], "ok") == pytest.approx(0.0025)
    with pytest.raises(RuntimeError, match="mean Dice"):
        check_drop(base, [0.79, 0.59], "too lossy")
    assert check_drop(base, [0.90, 0.70], "a gain is no loss") < 0


def test_two_sided_guard_also_rejects_a_large_gain():
    with pytest.raises(RuntimeError):
        check_drop([0.5, 0.5], [0.6, 0.6], "engines must equal the base", two_sided=True)


def _write_blind_encoder(_fp32: Path, out: Path) -> None:
    """An 'encoder' whose embeddings are all zero whatever the image: (B,3,256,256) -> (B,256,64,64)."""
    shape = helper.make_tensor("shape", TensorProto.INT64, [4], [1, 256, 64, 64])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    nodes = [helper.make_node("ReduceMean", ["image"], ["m"], axes=[1, 2, 3], keepdims=1),
             helper.make_node("Mul", ["m", "zero"], ["z"]),
             helper.make_node("Expand", ["z", "shape"], ["image_embeddings"])]
    graph = helper.make_graph(nodes, "blind", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                                             ["B", 3, 256, 256])],
                              [helper.make_tensor_value_info("image_embeddings", TensorProto.FLOAT,
                                                             ["B", 256, 64, 64])], initializer=[shape, zero])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(out))


def _write_flipped_decoder(fp32: Path, out: Path) -> None:
    """The fp32 prompt decoder with its mask logits negated: every mask turned inside out."""
    model = onnx.load(str(fp32))
    for node in model.graph.node:
        node.output[:] = ["unflipped_masks" if o == "low_res_masks" else o for o in node.output]
    model.graph.node.append(helper.make_node("Neg", ["unflipped_masks"], ["low_res_masks"]))
    onnx.save(model, str(out))


BROKEN = {  # a variant that must fail its guard: base variant, what is broken
    "int8-blind-encoder": ("medsam_lite_int8", {"write": _write_blind_encoder}),
    "bf16-blind-encoder": ("medsam_lite_bf16", {"write": _write_blind_encoder}),
    # the BF16 encoder as it is, its own decoder broken: the guard judges the decoder too
    "bf16-flipped-decoder": ("medsam_lite_bf16", {"decoder_write": _write_flipped_decoder}),
}


@pytest.mark.slow
@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_variant_that_fails_the_guard_is_not_written(tmp_path, shared_data, broken):
    source = ensure_models()
    repo = tmp_path / "repo"
    for name in ("medsam_lite_encoder", "medsam_lite_decoder"):
        shutil.copytree(source / name, repo / name)
    base, change = BROKEN[broken]
    blind = replace(VARIANTS[base], name="medsam_lite_blind", **change)
    with pytest.raises(RuntimeError, match="mean Dice"):
        export_encoder_variant(blind, ExportOptions(repository=repo, cache_dir=source.parent / ".cache"),
                               shared_data / "dev", limit=3)
    # neither the encoder nor (for BF16) its own decoder: no file, no folder left behind
    assert sorted(p.name for p in repo.iterdir()) == ["medsam_lite_decoder", "medsam_lite_encoder"]
    assert sorted(p.name for p in (repo / "medsam_lite_decoder" / "1").iterdir()) == sorted(
        p.name for p in (source / "medsam_lite_decoder" / "1").iterdir())


def test_variants_are_cpu_only(tmp_path):
    with pytest.raises(ValueError, match="CPU variant"):
        export_encoder_variant(VARIANTS["medsam_lite_bf16"], ExportOptions(repository=tmp_path, target="gpu"))
