"""Training the prompt-free 2-D U-Net from a volume: its slices, labelled by the reference masks
(method ``full``), by a one-box volume pseudo-label (:mod:`training.volume_pseudo_labels`, method
``pseudo``) or by the reference's bounding box on every slice (method ``boxes``), and its 3-D
evaluation on a held-out volume.

Nothing here is a second trainer: slices become :class:`~training.data.Case` objects, then a
:class:`~training.samples.SampleSet` (:func:`training.samples.prepare`), trained by
:func:`training.train.train` (seeded, resumable, the same checkpoint) and exported by
:func:`export.unet.export_checkpoint`. What this module adds:

* **label map** (:func:`label_map`): int64 ``(Z, H, W)`` in model orientation, 1 foreground,
  0 background, -1 ignored: the pseudo-label's *uncertain* voxels are -1 (a reference mask has
  none). In the model frame the zero padding is -1 too (:func:`training.samples.prepare`).
* **slice sampling** (:func:`training_slices`): every slice with a foreground voxel in the map,
  plus every slice ``k`` with ``k % background_every == 0`` that has none; a slice whose voxels
  are all -1 (all uncertain: nothing to learn from) is never kept. The same rule runs on each
  method's own map (the reference never chooses a pseudo-label's slices).
* **inputs**: each sample's image is exactly what the served model gets for that slice in
  ``SegmentVolume`` (``Volume.slice_pixels(k)`` -> :func:`service.core.segmenter_io.preprocess`,
  as :mod:`service.inference.volumes` does), so a CT window or a slice's own percentiles are
  the gateway's.
* **losses** (the trainer's methods, :data:`METHODS`): ``full`` (the issue's (a)) and ``pseudo``
  ((b)) share the trainer's ``dice_ce``: cross-entropy + a *batch* soft Dice of the foreground
  (:func:`training.losses.labelled_dice_ce_loss`), both over the pixels labelled 1/0 of the map in
  the SampleSet's ``scribbles`` channel, -1 ignored (for ``full`` only the padding, for ``pseudo``
  also the uncertain voxels). The Dice pools the batch because most sampled slices show no
  foreground; the trainer's per-image DiceCE (its ``full`` method, kept for the 2-D experiment,
  padding counted as background) collapsed to empty predictions on these volumes. ``boxes``
  ((c)) is the trainer's ``box_size`` (tightness prior + box fill) on one box per slice
  (:func:`slice_box`; a kept slice without foreground has no box, so it is all background).
  ``scribbles`` ((d)) is the trainer's ``scribble`` (partial CE) on the 2-D experiment's simulated
  scribbles of every kept slice (:func:`training.weak_labels.scribbles`, seeded per slice).
  ``full_ce`` / ``pseudo_ce`` are the same maps through partial cross-entropy only (the
  trainer's ``scribble``), controls that separate the label from the loss.
* **3-D evaluation** (:func:`predict_volume`, :func:`evaluate_volume`): the network on every
  slice through the serving path, stacked, against a reference mask: 3-D Dice and NSD at 2 mm
  (:mod:`training.volume_metrics`), spacing from the volume.
* **hemisphere split** (:func:`crop_nifti`, :func:`hemisphere_ranges`): a bilateral structure
  trains on one hemisphere and is evaluated on the other: the whole contralateral structure,
  never labelled, voxels ``x < nx // 2`` vs ``x > nx // 2`` (RAS+, the middle column in neither).

**2.5-D** (``TrainConfig.network.context_slices`` = c > 0, ``train-volume --context-slices c``):
each sample's image is the slice and its ``c`` neighbours on each side as ``2c + 1`` channels
(:func:`served_inputs`, :func:`service.core.segmenter_io.slice_inputs`, the edge slice
repeated past the volume's end), its label the middle slice's; exported with
``medseg.context_slices`` so that ``SegmentVolume`` feeds it the same stacks (a 2-D ``Segment``
refuses such a model).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from service.core.segmenter_io import postprocess, preprocess, slice_inputs
from service.core.volume import Volume, VolumeSource, load_volume
from training.data import Case
from training.samples import SampleSet, prepare
from training.train import TrainConfig, TrainResult, train
from training.volume_metrics import NSD_TOLERANCE_MM, dice, nsd
from training.weak_labels import WeakLabels, case_rng, scribbles

# volume method -> (the trainer's method, what supervises it)
METHODS = {
    "full": ("dice_ce", "reference masks of the training volume's slices (CE + batch Dice, padding ignored)"),
    "pseudo": ("dice_ce", "one-box volume pseudo-label, uncertain voxels ignored (CE + batch Dice)"),
    "boxes": ("box_size", "the reference's bounding box on every slice of the structure "
                          "(tightness prior + box fill)"),
    "scribbles": ("scribble", "simulated scribbles (training/weak_labels.py) on every kept slice of the reference "
                              "(partial CE)"),
    "full_ce": ("scribble", "reference masks through partial CE only (loss control)"),
    "pseudo_ce": ("scribble", "one-box volume pseudo-label, uncertain voxels ignored (partial CE only, control)"),
}
PSEUDO_METHODS = ("pseudo", "pseudo_ce")       # take a pseudo-label map; the others a reference mask
RUN_FILE = "volume_training.json"
SCRIBBLE_SEED = 0   # the simulated annotator's; scribbles do not change with the training seed
BACKGROUND_EVERY = 4


# --------------------------------------------------------------------------- pure rules
def label_map(label: np.ndarray, uncertain: np.ndarray | None = None) -> np.ndarray:
    """int64 like ``label``: 1 where ``label`` (bool or {0, 1}), else 0; -1 where ``uncertain``."""
    out = (np.asarray(label) > 0).astype(np.int64)
    if uncertain is not None:
        uncertain = np.asarray(uncertain, bool)
        if uncertain.shape != out.shape:
            raise ValueError(f"uncertain {uncertain.shape} does not fit the label {out.shape}")
        out[uncertain] = -1
    return out


def training_slices(labels: np.ndarray, background_every: int = BACKGROUND_EVERY) -> list[int]:
    """Slices of a 1/0/-1 map ``(Z, H, W)`` that become samples (rule in the module doc)."""
    if background_every < 1:
        raise ValueError(f"background_every must be at least 1, got {background_every}")
    flat = np.asarray(labels).reshape(len(labels), -1)
    foreground, certain = (flat == 1).any(axis=1), (flat >= 0).any(axis=1)
    return [k for k in range(len(flat)) if certain[k] and (foreground[k] or k % background_every == 0)]


# --------------------------------------------------------------------------- volumes and crops
def read_volume(path: Path, window: tuple[float, float] | None = None) -> Volume:
    """A NIfTI file as the gateway loads an upload of it (``window``: centre, width)."""
    from service.core.domain import Window

    return load_volume(VolumeSource("nifti", data=Path(path).read_bytes(),
                                    window=Window(*window) if window else None))


def model_masks(mask_file: Path, volume: Volume) -> np.ndarray:
    """bool ``(Z, H, W)`` in ``volume``'s model orientation: a mask NIfTI on the same grid."""
    from training.volume_pseudo_labels import reference_slices

    return reference_slices(read_volume(mask_file), volume)


def pseudo_label_map(folder: Path, name: str, volume: Volume):
    """(1/0/-1 map ``(Z, H, W)`` in model orientation, the :class:`VolumePseudoLabel`) of a
    pseudo-label saved by :func:`training.volume_pseudo_labels.save` for ``volume``: its label
    and uncertain files are read as the mask NIfTIs they are (same grid as the volume)."""
    from training import volume_pseudo_labels as vpl

    folder = Path(folder)
    pl = vpl.load(folder, name)
    label = model_masks(folder / f"{name}_label.nii.gz", volume)
    uncertain = model_masks(folder / f"{name}_uncertain.nii.gz", volume)
    return label_map(label, uncertain), pl


def crop_nifti(source: Path, out: Path, x: tuple[int, int] | None = None, y: tuple[int, int] | None = None,
               z: tuple[int, int] | None = None) -> Path:
    """Write voxels ``[x0:x1, y0:y1, z0:z1]`` of a NIfTI (stored axes; None = all) to ``out``,
    same dtype and scaling, the affine moved so every voxel keeps its world position."""
    import nibabel as nib

    image = nib.load(str(source))
    window = tuple(slice(*r) if r is not None else slice(None) for r in (x, y, z))
    crop = image.slicer[window]
    out.parent.mkdir(parents=True, exist_ok=True)
    nib.save(crop, str(out))
    return out


def hemisphere_ranges(nx: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Voxel x ranges (RAS+: x increases to the subject's right) of the left and right
    hemisphere of a volume ``nx`` columns wide; the middle column ``nx // 2`` is in neither."""
    mid = nx // 2
    return (0, mid), (mid + 1, nx)


# --------------------------------------------------------------------------- samples
def served_inputs(volume: Volume, ks: Sequence[int], size: int, context: int = 0) -> torch.Tensor:
    """float32 ``(N, 2 * context + 1, size, size)``: what ``SegmentVolume`` feeds the segmenter
    for slices ``ks`` (``context`` > 0: a 2.5-D segmenter, each slice with that many neighbours
    on each side as channels): :func:`service.core.segmenter_io.slice_inputs`, as the gateway."""
    return torch.as_tensor(slice_inputs(volume.slice_pixels, volume.depth, list(ks), size, context)[0])


def slice_box(mask: np.ndarray) -> np.ndarray:
    """float32 ``(K, 4)`` XYXY (API convention, end exclusive): the bounding box of a slice's
    foreground, one box for all of it (``(0, 4)`` when the slice has none): what an annotator
    boxing each slice of the structure draws."""
    rows, cols = np.nonzero(np.asarray(mask))
    if rows.size == 0:
        return np.zeros((0, 4), np.float32)
    return np.asarray([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], np.float32)


def slice_weak_labels(method: str, case_id: str, labels: np.ndarray) -> WeakLabels:
    """What supervises one slice (``labels``: its 1/0/-1 map ``(H, W)``): ``boxes`` gets
    :func:`slice_box` of the foreground, ``scribbles`` the 2-D experiment's simulated scribbles
    of the foreground (:func:`training.weak_labels.scribbles`: strokes inside it, around it and in
    the far background; the rest -1), every other method the whole map as a dense scribble
    map (the trainer's ``scribbles`` channel; :func:`training.samples.prepare` makes its
    padding -1)."""
    if method == "boxes":
        return WeakLabels(case_id, labels.shape, boxes=slice_box(labels == 1))
    if method == "scribbles":   # drawn once per slice, whatever the training seed
        return WeakLabels(case_id, labels.shape, scribbles=scribbles(labels == 1, case_rng(SCRIBBLE_SEED, case_id)))
    return WeakLabels(case_id, labels.shape, scribbles=labels.astype(np.int8))


def volume_samples(volume: Volume, labels: np.ndarray, size: int, method: str, name: str = "volume",
                   background_every: int = BACKGROUND_EVERY, context: int = 0) -> SampleSet:
    """A :class:`SampleSet` of the slices :func:`training_slices` keeps from the 1/0/-1 map
    ``labels`` (model orientation, ``(Z, H, W)``). The map's foreground is the samples'
    ``masks``; it also goes in ``scribbles`` (1/0/-1, padding -1), or, for ``boxes``, becomes
    one box per slice (:func:`slice_weak_labels`). Methods other than :data:`PSEUDO_METHODS`
    take a reference mask: no -1 voxels. ``context``: the images are 2.5-D (:func:`served_inputs`);
    labels stay those of the middle slice."""
    if method not in METHODS:
        raise ValueError(f"unknown volume method {method!r}; choose one of {tuple(METHODS)}")
    labels = np.asarray(labels, np.int64)
    if labels.shape != (volume.depth, *volume.slice_shape):
        raise ValueError(f"labels {labels.shape} do not fit the volume {(volume.depth, *volume.slice_shape)}")
    if method not in PSEUDO_METHODS and (labels < 0).any():
        raise ValueError(f"method {method!r} takes a reference mask: it has no ignored (-1) voxels")
    ks = training_slices(labels, background_every)
    if not ks:
        raise ValueError("no slice of the volume has a certain label")
    cases, weak = [], {}
    for k in ks:
        case_id = f"{name}_z{k:03d}"
        cases.append(Case(case_id, volume.slice_pixels(k), labels[k] == 1,
                          {"case_id": case_id, "structure": name, "slice_index": k}))
        weak[case_id] = slice_weak_labels(method, case_id, labels[k])
    samples = prepare(cases, size, weak)
    # prepare() normalises a native image; the served input of a volume slice is its own
    return replace(samples, images=served_inputs(volume, ks, size, context))


def slice_indices(samples: SampleSet) -> list[int]:
    return [int(c.rsplit("_z", 1)[1]) for c in samples.case_ids]


# --------------------------------------------------------------------------- training
def train_volume(cfg: TrainConfig, volume: Volume, labels: np.ndarray, method: str, run_dir: Path,
                 resume: bool = True, background_every: int = BACKGROUND_EVERY, source: dict | None = None,
                 stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train ``cfg`` (its ``method`` is set from ``method``) on a volume's slices; resumable
    exactly as :func:`training.train.train`. ``run_dir/volume_training.json`` records the
    volume method, the slices and ``source`` (where volume and labels came from)."""
    cfg = replace(cfg, method=METHODS[method][0])
    samples = volume_samples(volume, labels, cfg.size, method, cfg.structure, background_every,
                             cfg.network.context_slices)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ks = slice_indices(samples)
    record = {"method": method, "trainer_method": cfg.method, "supervision": METHODS[method][1],
              "background_every": background_every, "slices": ks, "context_slices": cfg.network.context_slices,
              "foreground_slices": [k for k in ks if (labels[k] == 1).any()],
              "ignored_fraction": float((labels[ks] < 0).mean()), "source": source or {}}
    path = run_dir / RUN_FILE
    if resume and path.is_file() and (run_dir / "checkpoint.pt").is_file():
        old = json.loads(path.read_text())
        if (old.get("method"), old.get("slices"), old.get("context_slices", 0)) != (
                method, ks, cfg.network.context_slices):
            raise ValueError(f"{path} was written for method {old.get('method')!r} on other slices or with "
                             f"other context slices ({old.get('context_slices', 0)}); use another run folder "
                             "(or restart)")
    path.write_text(json.dumps(record, indent=1))
    return train(cfg, samples, run_dir, resume=resume, stop_after=stop_after, progress=progress)


def export(run_dir: Path, repository: Path, name: str, target: str = "cpu", version: int = 1) -> list[Path]:
    """:func:`export.unet.export_checkpoint` of a volume run, described by its volume method."""
    from export.unet import export_checkpoint

    run_dir = Path(run_dir)
    record = json.loads((run_dir / RUN_FILE).read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    context = int(cfg["network"].get("context_slices", 0))
    depth = f" x {2 * context + 1} neighbouring slices (2.5-D)" if context else ""
    description = (f"MONAI 2-D U-Net {tuple(cfg['network']['channels'])}, input {cfg['size']}x{cfg['size']}{depth}, "
                   f"segments {cfg['structure']} without prompts, slice by slice; trained on the slices of one "
                   f"volume from {record['supervision']} ({cfg['iterations']} iterations, seed {cfg['seed']})")
    return export_checkpoint(run_dir / "checkpoint.pt", repository, name, target, version, description)


# --------------------------------------------------------------------------- 3-D evaluation
@dataclass(frozen=True)
class VolumeScore:
    dice: float
    nsd: float                          # at ``tolerance_mm``
    tolerance_mm: float
    predicted_voxels: int
    reference_voxels: int
    predicted_slices: tuple[int, int] | None
    reference_slices: tuple[int, int] | None

    def to_dict(self) -> dict:
        return asdict(self)


def predict_volume(model: torch.nn.Module, volume: Volume, size: int, batch: int = 8, context: int = 0) -> np.ndarray:
    """bool ``(Z, H, W)`` model orientation: the network on every slice, as ``SegmentVolume``
    serves it (:func:`served_inputs`, then :func:`service.core.segmenter_io.postprocess`);
    ``context``: the network's neighbouring slices on each side (2.5-D)."""
    out = np.zeros((volume.depth, *volume.slice_shape), bool)
    frame = preprocess(volume.slice_pixels(0), size)[1]
    model = model.eval()
    for start in range(0, volume.depth, batch):
        ks = list(range(start, min(volume.depth, start + batch)))
        with torch.no_grad():
            logits = model(served_inputs(volume, ks, size, context)).numpy()
        for i, k in enumerate(ks):
            out[k] = postprocess(logits[i:i + 1], frame)
    return out


def _extent(masks: np.ndarray) -> tuple[int, int] | None:
    got = np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1))
    return (int(got[0]), int(got[-1])) if got.size else None


def score_masks(pred: np.ndarray, ref: np.ndarray, volume: Volume,
                tolerance_mm: float = NSD_TOLERANCE_MM) -> VolumeScore:
    """3-D Dice and NSD of bool ``(Z, H, W)`` model-orientation masks of ``volume``."""
    row, col, slc = volume.spacing_mm
    return VolumeScore(dice(pred, ref), nsd(pred, ref, (slc, row, col), tolerance_mm), float(tolerance_mm),
                       int(pred.sum()), int(ref.sum()), _extent(pred), _extent(ref))


def evaluate_volume(model: torch.nn.Module, volume: Volume, reference: np.ndarray, size: int,
                    tolerance_mm: float = NSD_TOLERANCE_MM, context: int = 0) -> VolumeScore:
    return score_masks(predict_volume(model, volume, size, context=context), np.asarray(reference, bool), volume,
                       tolerance_mm)
