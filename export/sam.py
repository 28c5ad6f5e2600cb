"""SAM ViT-B/L/H (Meta's checkpoints) and MedSAM ViT-B from a site's checkpoint, as two ONNX models.

``python -m export sam --checkpoint FILE --variant vit_b|vit_l|vit_h [--name NAME]
[--preprocessing sam|medsam]`` builds the network with ``segment_anything``'s own builders
(``sam_model_registry``), loads the checkpoint strictly (:func:`load_checkpoint` names what is
wrong with a file that does not fit), and writes

* ``NAME_encoder``: ``image`` float32 ``(B, 3, 1024, 1024)`` in [0, 1] -> ``image_embeddings``
  ``(B, 256, 64, 64)``. With ``sam`` preprocessing the graph normalises with SAM's pixel mean and
  std (so a Triton client sends [0, 1] pixels, as for LiteMedSAM) and the gateway pads with the
  mean, which the graph turns into SAM's zero padding; with ``medsam`` (MedSAM's ViT-B
  fine-tune) the image is stretched to 1024 x 1024 and fed as is, as MedSAM's own inference does.
* ``NAME_decoder``: :class:`export.prompt_decoder.PromptDecoderForExport` on the 1024-pixel
  frame: for SAM all four mask tokens (the gateway returns the best of the three candidates for
  a lone click, SAM's single-mask output otherwise, or all three on request); for MedSAM the
  single-mask output it was trained with (boxes required, like LiteMedSAM).

Each file is checked against PyTorch right after writing: ONNX Runtime vs the wrapper on the
export inputs (:func:`export.onnx_io.export_onnx`), then the served predictor against
``segment_anything``'s own modules (``Sam.preprocess``, ``PromptEncoder``, ``MaskDecoder``)
on real images with boxes, clicks and all candidates (max logit difference, mask IoU). The
checkpoint's sha256 is the model version's suffix and ``medseg.weights_sha256``; the memory one
entry takes loaded and run once is measured in a child process (``medseg.memory_bytes``), and
the gateway refuses at start-up a repository whose models do not fit its memory.

No weights are downloaded: without a site's checkpoint the path is proven with randomly
initialised weights of the real architectures (:func:`random_checkpoint`; ``vit_tiny`` is the
real classes at reduced depth and width, for the tests).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import time
import types
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.onnx_io import export_onnx, run_onnx
from export.options import ExportOptions
from export.prompt_decoder import DYNAMIC_AXES, INPUTS as DECODER_INPUTS, OUTPUTS as DECODER_OUTPUTS
from export.prompt_decoder import PromptDecoderForExport, decoder_entry, example_inputs
from export.memory_probe import write_measured_config
from service.backends.repository import GatewayParameters, RepositoryEntry, Role, TensorSpec
from service.core.domain import PromptKind
from service.core.geometry import SAM_PIXEL_MEAN, SAM_PIXEL_STD

log = logging.getLogger(__name__)

IMAGE_SIZE = 1024
EMBED_SHAPE = (256, 64, 64)
LOW_RES = 256
PREPROCESSINGS = ("sam", "medsam")


@dataclass(frozen=True)
class Variant:
    """One ``segment_anything`` architecture: its builder's arguments."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]

    def build(self) -> nn.Module:
        """The network, randomly initialised, in eval mode (``segment_anything``'s ``_build_sam``,
        what ``sam_model_registry[name]`` calls)."""
        build_sam = _segment_anything("build_sam")
        torch.manual_seed(0)
        return build_sam._build_sam(encoder_embed_dim=self.embed_dim, encoder_depth=self.depth,
                                    encoder_num_heads=self.num_heads,
                                    encoder_global_attn_indexes=list(self.global_attn_indexes)).eval()


VARIANTS = {
    "vit_b": Variant("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": Variant("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": Variant("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # the real classes at reduced depth and width: what the tests export (not a released model)
    "vit_tiny": Variant("vit_tiny", 96, 2, 2, (1,)),
}
PUBLIC_VARIANTS = ("vit_b", "vit_l", "vit_h")


def _segment_anything(module: str) -> types.ModuleType:
    """``segment_anything.<module>`` without running the package ``__init__``, which imports
    torchvision (CUDA-linked on PyPI, unusable with CPU torch; see ../shared/ENVIRONMENT.md)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("segment-anything is not installed (pinned in requirements; run `make install`)")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["segment_anything"] = package
    return importlib.import_module(f"segment_anything.{module}")


def _check_registry(variant: str) -> None:
    """The public variants' arguments are the ones ``sam_model_registry`` builds (checked
    against its source once, so a different segment-anything release cannot drift silently)."""
    if variant not in PUBLIC_VARIANTS:
        return
    build_sam = _segment_anything("build_sam")
    if variant not in build_sam.sam_model_registry:
        raise RuntimeError(f"segment_anything's sam_model_registry has no {variant!r}")


# --------------------------------------------------------------------------- checkpoints
def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_encoder(state: dict) -> tuple[int, int] | None:
    """(embed dim, blocks) of the image encoder a state dict holds, if it holds one."""
    proj = state.get("image_encoder.patch_embed.proj.weight")
    if not isinstance(proj, torch.Tensor) or proj.ndim != 4:
        return None
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()}
    return int(proj.shape[0]), len(blocks)


def _variant_of(shape: tuple[int, int]) -> str:
    for v in PUBLIC_VARIANTS:
        if (VARIANTS[v].embed_dim, VARIANTS[v].depth) == shape:
            return v
    return ""


def load_checkpoint(path: Path, variant: str) -> dict:
    """The state dict in ``path`` for a ``variant`` network, or ``ValueError`` naming the problem:
    not a readable PyTorch file (truncated, another format), not a SAM state dict, a checkpoint
    of another variant, missing or unexpected weights, or weights of the wrong shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle errors of a truncated or foreign file
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"checkpoint {path} is not a readable PyTorch checkpoint (truncated, or not a .pth "
                         f"state dict; {path.stat().st_size} bytes): {first}") from None
    for key in ("model", "state_dict"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    want = VARIANTS[variant]
    shape = describe_encoder(state)
    if shape is None:
        raise ValueError(f"checkpoint {path} has no SAM image encoder (no image_encoder.patch_embed.proj.weight): "
                         "not a SAM or MedSAM checkpoint")
    if shape != (want.embed_dim, want.depth):
        other = _variant_of(shape)
        hint = f"pass --variant {other}" if other else "no released SAM variant has this shape"
        raise ValueError(f"checkpoint {path} holds a{' SAM ' + other if other else 'n'} image encoder of embed dim "
                         f"{shape[0]} with {shape[1]} blocks, not {variant} ({want.embed_dim}, {want.depth}): {hint}")
    return state


def build(variant: str, checkpoint: Path) -> nn.Module:
    """``variant``'s network with ``checkpoint`` loaded strictly (eval mode)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {', '.join(PUBLIC_VARIANTS)}")
    _check_registry(variant)
    state = load_checkpoint(checkpoint, variant)
    net = VARIANTS[variant].build()
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} of the model's {len(expected)} weights (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"has {len(unexpected)} weights the model does not (e.g. {', '.join(unexpected[:3])})")
        raise ValueError(f"checkpoint {checkpoint} {' and '.join(parts)}: not a complete {variant} SAM/MedSAM "
                         "checkpoint")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise ValueError(f"checkpoint {checkpoint}: {len(wrong)} weights have the wrong shape (e.g. {k}: "
                         f"{tuple(state[k].shape)}, the model needs {tuple(expected[k].shape)})")
    net.load_state_dict(state, strict=True)
    return net.eval()


def random_checkpoint(variant: str, path: Path, seed: int = 0) -> Path:
    """Write a randomly initialised ``variant`` state dict to ``path`` (what the tests and the
    benchmarks export: no checkpoint can be downloaded here)."""
    torch.manual_seed(seed)
    net = VARIANTS[variant].build()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


# --------------------------------------------------------------------------- wrappers
class SamEncoderForExport(nn.Module):
    """The image encoder on a [0, 1] input; ``sam`` preprocessing normalises in the graph."""

    def __init__(self, net: nn.Module, preprocessing: str) -> None:
        super().__init__()
        self.image_encoder = net.image_encoder
        self.normalise = preprocessing == "sam"
        self.register_buffer("mean", torch.tensor(SAM_PIXEL_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(SAM_PIXEL_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.normalise:
            image = (image - self.mean) / self.std
        return self.image_encoder(image)


def default_name(variant: str, preprocessing: str) -> str:
    return f"{'medsam' if preprocessing == 'medsam' else 'sam'}_{variant}"


def sam_entries(name: str, variant: str, preprocessing: str, weights: str, batch: bool = True
                ) -> tuple[RepositoryEntry, RepositoryEntry]:
    """The two repository entries of a SAM/MedSAM export."""
    version = f"1-{weights[:8]}"
    medsam = preprocessing == "medsam"
    if medsam:
        kinds, required = frozenset({PromptKind.BOX, PromptKind.MASK}), frozenset({PromptKind.BOX})
        description = (f"MedSAM ({variant.replace('_', '-').upper()}, SAM fine-tuned on medical images) from a site's "
                       f"checkpoint (sha256 {weights[:12]}); trained with box prompts: every prompt needs a box; "
                       "the image is stretched to 1024x1024")
    else:
        kinds, required = frozenset({PromptKind.BOX, PromptKind.POINT, PromptKind.MASK}), frozenset()
        description = (f"Segment Anything {variant.replace('_', '-').upper()} from a site's checkpoint (sha256 "
                       f"{weights[:12]}); boxes, positive/negative points and a previous mask, alone or together; "
                       "3 candidate masks per prompt (the best returned unless all are asked for)")
    outputs = 1 if medsam else 4
    encoder = RepositoryEntry(
        name=f"{name}_encoder",
        inputs=(TensorSpec("image", (3, IMAGE_SIZE, IMAGE_SIZE)),),
        outputs=(TensorSpec("image_embeddings", EMBED_SHAPE),),
        max_batch_size=4 if batch else 0,
        dynamic_batching=batch,
        preferred_batch_sizes=(2, 4) if batch else (),
        gateway=GatewayParameters(model=name, role=Role.IMAGE_ENCODER, version=version, input_size=IMAGE_SIZE,
                                  prompt_kinds=kinds, required_prompt_kinds=required, description=description,
                                  weights_sha256=weights, preprocessing=preprocessing),
    )
    if not batch:
        encoder = replace(encoder, inputs=(TensorSpec("image", (1, 3, IMAGE_SIZE, IMAGE_SIZE)),),
                          outputs=(TensorSpec("image_embeddings", (1, *EMBED_SHAPE)),))
    decoder = decoder_entry(name, version, outputs, EMBED_SHAPE, LOW_RES)
    return encoder, decoder


# --------------------------------------------------------------------------- export
def _batch_exports_cleanly(path: Path) -> bool:
    """Does the encoder file answer a batch of 2 (the legacy exporter may freeze the batch)?"""
    try:
        image = np.random.default_rng(1).random((2, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
        (out,) = run_onnx(path, {"image": image}, ["image_embeddings"])
        return out.shape[0] == 2
    except Exception as exc:  # noqa: BLE001 - any failure means: serve it unbatched
        log.info("%s: batch of 2 refused (%s); the entry is written unbatched", path.name, type(exc).__name__)
        return False


def export_sam(opts: ExportOptions) -> list[Path]:
    """Write the encoder and decoder ONNX files of ``opts.checkpoint`` (each checked against
    PyTorch), their config.pbtxt entries, and check the served predictor against
    ``segment_anything``'s own modules. Returns the written paths."""
    if opts.checkpoint is None:
        raise ValueError("sam needs --checkpoint FILE (e.g. sam_vit_b_01ec64.pth or medsam_vit_b.pth)")
    variant, preprocessing = opts.sam_variant, opts.preprocessing or "sam"
    if preprocessing not in PREPROCESSINGS:
        raise ValueError(f"--preprocessing {preprocessing!r}: choose sam (Meta's SAM) or medsam (MedSAM ViT-B)")
    name = opts.name or default_name(variant, preprocessing)
    start = time.perf_counter()
    weights = sha256_of(Path(opts.checkpoint)) if Path(opts.checkpoint).is_file() else ""
    net = build(variant, Path(opts.checkpoint))
    log.info("%s: %s checkpoint loaded strictly (sha256 %s, %.1f M parameters)", name, variant, weights[:12],
             sum(p.numel() for p in net.parameters()) / 1e6)
    encoder_entry, decoder_entry = sam_entries(name, variant, preprocessing, weights)
    enc_path = opts.repository / encoder_entry.name / str(opts.version) / encoder_entry.runtime.onnx_filename
    dec_path = opts.repository / decoder_entry.name / str(opts.version) / decoder_entry.runtime.onnx_filename
    written: list[Path] = []
    # segment_anything's shape arithmetic is traced as constants for the fixed 1024 input: expected
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    if opts.force or not enc_path.exists():
        image = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
        export_onnx(SamEncoderForExport(net, preprocessing), {"image": image}, ["image_embeddings"],
                    {"image": {0: "batch"}, "image_embeddings": {0: "batch"}}, enc_path)
        written.append(enc_path)
    if not _batch_exports_cleanly(enc_path):
        encoder_entry, _ = sam_entries(name, variant, preprocessing, weights, batch=False)
    if opts.force or not dec_path.exists():
        outputs = decoder_entry.tensor("low_res_masks").dims[1]
        export_onnx(PromptDecoderForExport(net, IMAGE_SIZE, outputs), example_inputs(IMAGE_SIZE, EMBED_SHAPE, LOW_RES),
                    list(DECODER_OUTPUTS), DYNAMIC_AXES, dec_path)
        written.append(dec_path)
    export_s = time.perf_counter() - start
    for entry in (encoder_entry, decoder_entry):
        written.append(write_measured_config(opts.repository, entry, opts.target, opts.version))
    log.info("%s: exported in %.1f s", name, export_s)
    if opts.check_cases != 0:
        check_against_torch(net, opts, name, preprocessing, limit=opts.check_cases)
    return written


# --------------------------------------------------------------------------- parity
MIN_IOU = 0.99


def torch_reference(net: nn.Module, pixels: np.ndarray, prompt, preprocessing: str, multimask: bool
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Low-res logits ``(K, 256, 256)`` and IoUs ``(K,)`` of ``segment_anything``'s own modules:
    ``Sam.preprocess`` (normalise, then pad) on the resized image, ``PromptEncoder.forward``
    and ``MaskDecoder.forward``; the prompt mapped to the model frame as the gateway maps it."""
    from service.core import geometry as st

    tensor, frame = st.model_input(pixels, IMAGE_SIZE, "" if preprocessing == "sam" else preprocessing)
    with torch.no_grad():
        x = torch.from_numpy(tensor)
        if preprocessing == "sam":
            h, w = frame.resized_hw
            x = net.preprocess(x[:, :, :h, :w] * 255.0)  # SAM's own normalise-then-pad
        embedding = net.image_encoder(x)
        points = boxes = masks = None
        if prompt.points:
            coords, labels = st.points_to_model(prompt.points, frame)
            points = (torch.from_numpy(coords)[None], torch.from_numpy(labels)[None])
        if prompt.box is not None:
            boxes = torch.from_numpy(st.box_to_model(prompt.box, frame))[None]
        if prompt.mask_input is not None:
            masks = torch.from_numpy(prompt.mask_input)[None, None]
        sparse, dense = net.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low, iou = net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                                    sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                    multimask_output=multimask)
    return low[0].numpy(), iou[0].numpy()


def check_against_torch(net: nn.Module, opts: ExportOptions, name: str, preprocessing: str,
                        limit: int | None = 2) -> None:
    """The served predictor (ONNX files, gateway preprocessing and prompt feeds) against
    ``segment_anything``'s modules on ``limit`` evidence images, each with its box, a click at
    the box centre, box + click, and (SAM) all three candidates of the click; ``RuntimeError``
    if a mask IoU is below :data:`MIN_IOU`."""
    from export.dev_cases import check_evidence, iou
    from service.core.domain import Point, Prompt
    from service.inference.predictor import SamPredictor

    evidence = check_evidence(opts.data_dir, limit)
    predictor = SamPredictor.from_repository(opts.repository, name, version=opts.version)
    sam = predictor.info.mask_candidates > 1
    print(f"{name} parity evidence: {evidence.describe()}")
    worst_iou, worst_logit, seen = 1.0, 0.0, {}
    for item in evidence.items:
        key = id(item.pixels)
        if key not in seen:
            seen[key] = predictor.embed(item.pixels)
        embedding = seen[key]
        b = item.box
        click = Point((b.x0 + b.x1) / 2, (b.y0 + b.y1) / 2, True)
        cases = [("box", Prompt(box=b), False)]
        if sam:
            cases += [("click", Prompt(points=(click,)), False), ("box+click", Prompt(box=b, points=(click,)), False),
                      ("click, 3 candidates", Prompt(points=(click,)), True)]
        for label, prompt, multimask in cases:
            low, ious = predictor.predict(embedding, [prompt], candidates=multimask)
            got = low[0] if multimask else low
            want, want_iou = torch_reference(net, item.pixels, prompt, preprocessing, multimask)
            if not multimask and sam:  # the gateway's choice among the four outputs, made on the reference too
                from service.inference.predictor import choose

                all_low, all_iou = torch_reference(net, item.pixels, prompt, preprocessing, True)
                single, single_iou = torch_reference(net, item.pixels, prompt, preprocessing, False)
                stacked = np.concatenate([single, all_low]), np.concatenate([single_iou, all_iou])
                c = choose(prompt, stacked[1])
                want = stacked[0][c:c + 1]
            diff = float(np.abs(want - got).max())
            masks_want, masks_got = predictor.masks(want, embedding.frame), predictor.masks(got, embedding.frame)
            case_iou = min(iou(a, g) if (a.any() or g.any()) else 1.0 for a, g in zip(masks_want, masks_got))
            worst_iou, worst_logit = min(worst_iou, case_iou), max(worst_logit, diff)
            print(f"{name} parity {item.case_id[:38]:38s} {label:20s} max|dlogit| {diff:.2e}  mask IoU {case_iou:.5f}")
    ok = worst_iou >= MIN_IOU
    print(f"{name} parity: worst mask IoU {worst_iou:.5f} (need >= {MIN_IOU}), max |logit difference| "
          f"{worst_logit:.2e} -> {'OK' if ok else 'FAILED'}")
    if not ok:
        raise RuntimeError(f"{name}: the exported files differ from PyTorch (worst mask IoU {worst_iou:.4f})")


__all__ = ["VARIANTS", "PUBLIC_VARIANTS", "build", "load_checkpoint", "random_checkpoint", "export_sam",
           "sam_entries", "check_against_torch", "DECODER_INPUTS"]
