"""Volume pseudo-labels from image-level labels: slice ticks -> classifier -> CAM -> box -> LiteMedSAM.

The only supervision is a person ticking, for every axial slice of the training volume, whether
the structure is *present* on it (issue 15, item 3; the seeds' CAM family). Nothing else of the
reference is used. The chain:

* **ticks** (:func:`ticks_from_mask`): slice ``k`` is ticked present when the reference mask has
  any voxel on it (the simulated annotator); bool ``(Z,)`` in the volume's model orientation.
* **classifier** (:class:`SliceClassifier`, :func:`train_classifier`): a small CNN, MONAI
  ``Convolution`` blocks (conv -> batch norm -> ReLU; strides :data:`ClassifierConfig.strides`),
  then global average pooling and one linear unit: the logit "present". Its input is exactly what
  the served segmenter gets for the slice (``Volume.slice_pixels(k)`` ->
  :func:`service.core.segmenter_io.preprocess`, letterboxed ``size x size``,
  :func:`training.volume_training.served_inputs`). Trained with BCE on the ticks, batches drawn
  half from present and half from absent slices (most slices of a large structure are present),
  light augmentation (intensity gain ``1 +- gain``, offset ``+- offset``, a random shift of up to
  ``shift_px`` pixels), Adam, seeded, ``threads`` torch threads. Caveat: a tick says nothing
  about *where*, and nothing forces the classifier to look at the structure: under the
  gateway's per-slice percentile window (a NIfTI without a window) a bright object also darkens
  the rest of its slice, and a GAP classifier may learn the slice's global statistics instead
  (tests/training/test_cam_labels.py: on its synthetic square the CAM box is the whole slice
  with per-slice percentiles and lands on the square with a fixed window). So
  ``ClassifierConfig.window`` ``"volume"`` feeds the classifier (and its CAM) the slices under
  the volume's one window instead (:func:`classifier_volume`: for a volume windowed by slice
  percentiles, the volume's own 0.5-99.5 percentiles, which :class:`Volume` keeps); LiteMedSAM
  and the U-Net keep the served pixels. The default ``"served"`` is the served input.
* **CAM** (:func:`class_activation_maps`): MONAI's :class:`monai.visualize.CAM` on the last
  conv block (``features``), with the linear unit's weights *without its bias* (the classic CAM:
  ``sum_c w_c f_c(x, y)``), bilinearly upsampled to the model frame by MONAI, no normalisation;
  then the letterbox's valid region is resized back to the slice's pixels
  (:func:`service.core.geometry.upsample_logits`, as a served mask is). Computed only for the
  slices ticked present.
* **CAM -> box** (:func:`cam_box`): pixels where the CAM is at least :data:`CAM_THRESHOLD` of the
  slice's CAM maximum (a slice whose maximum is not positive has no box), the largest
  4-connected component of them, its bounding box (XYXY, end exclusive, the slice's
  model-orientation pixels), grown by :data:`BOX_MARGIN` of its side on every side and clipped
  to the slice.
* **refine** (:func:`refine`): each box prompts the *served* LiteMedSAM through the gateway's
  predictor (:class:`service.inference.predictor.SamPredictor`: ``embed`` of the slice's pixels,
  ``predict`` with the box, ``masks``), and the mask is kept inside the box (pixels whose centre
  lies in it, :func:`training.pseudo_labels.box_region`: "SAM inside the box").
* **label** (:func:`assemble`): the stacked masks, and the uncertain voxels (ignored by the
  losses) of :func:`training.volume_pseudo_labels.uncertain_mask` with its
  :class:`~training.volume_pseudo_labels.UncertainRules`: a ticked slice whose predicted IoU is
  below ``min_iou`` is uncertain as a whole, and every slice has the ``edge_px`` band around the
  mask edge; there is no propagation, so no stop slices. Added here: a slice ticked present that
  got no box or an empty mask is uncertain as a whole (the tick says "something is here", the
  chain found nothing). Slices ticked *absent* are certain background (label 0, never uncertain).
  Outside the box on a present slice is background, as in the 2-D box rule.

Saved with :func:`training.volume_pseudo_labels.save` (``NAME_label.nii.gz``,
``NAME_uncertain.nii.gz``, ``NAME.json``), so ``python -m training train-volume --method pseudo
--pseudo DIR`` and :func:`training.volume_training.pseudo_label_map` read it unchanged. The JSON's
one-box fields are filled as follows: ``key_slices`` and ``boxes_model_xyxy`` are the slices that
got a CAM box and those boxes; ``slices`` has one record per ticked slice (``source`` "cam box",
its predicted IoU and mask area; IoU 0 where there was no box); ``stops`` is empty; ``bounds`` is
the whole volume; ``reference_extent`` is the extent of the *ticks* (what the annotator said,
which equals the reference's slice extent). :func:`save` adds a ``cam`` entry: the ticks, the
classifier's settings and times, the threshold and margin.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage

from service.core.volume import Volume

CAM_THRESHOLD = 0.5      # a CAM pixel is "on" at >= this fraction of its slice's CAM maximum
BOX_MARGIN = 0.05        # the component's box grows by this fraction of its side, on each side
SOURCE = "cam box"       # SliceRecord.source of a ticked slice


# --------------------------------------------------------------------------- pure rules
def ticks_from_mask(mask: np.ndarray) -> np.ndarray:
    """bool ``(Z,)``: slice ``k`` of bool ``(Z, H, W)`` ``mask`` has any foreground voxel."""
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"expected a (Z, H, W) mask, got shape {mask.shape}")
    return mask.reshape(len(mask), -1).any(axis=1)


def largest_component(on: np.ndarray) -> np.ndarray:
    """bool like ``on`` ``(H, W)``: its largest 4-connected component (the first one in scan
    order of the largest ones on a tie); empty when ``on`` is."""
    on = np.asarray(on, bool)
    labels, n = ndimage.label(on)
    if n == 0:
        return np.zeros(on.shape, bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def grow_box(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float
             ) -> tuple[int, int, int, int]:
    """XYXY (end exclusive) ``box`` grown by ``round(margin * side)`` pixels on each side
    (width for x, height for y), clipped to ``shape`` (rows, columns)."""
    x0, y0, x1, y1 = box
    dx, dy = int(round(margin * (x1 - x0))), int(round(margin * (y1 - y0)))
    h, w = shape
    return max(0, x0 - dx), max(0, y0 - dy), min(w, x1 + dx), min(h, y1 + dy)


def cam_box(cam: np.ndarray, threshold: float = CAM_THRESHOLD, margin: float = BOX_MARGIN
            ) -> tuple[int, int, int, int] | None:
    """The box of one slice's CAM ``(H, W)`` (rule in the module doc): XYXY, end exclusive, in
    its pixels; None when the CAM's maximum is not positive (or not finite)."""
    cam = np.asarray(cam, np.float64)
    top = float(np.max(cam)) if cam.size else 0.0
    if not np.isfinite(top) or top <= 0:
        return None
    component = largest_component(cam >= threshold * top)
    rows, cols = np.nonzero(component)
    box = (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)
    return grow_box(box, cam.shape, margin)


def box_masks(shape: tuple[int, int, int], boxes: dict[int, tuple[float, float, float, float]]) -> np.ndarray:
    """bool ``shape`` ``(Z, H, W)``: each slice's box filled (pixels whose centre is inside it,
    as :func:`training.pseudo_labels.box_region`); slices without a box empty. The "CAM box
    only" label: what the boxes alone say."""
    from training.pseudo_labels import box_region

    out = np.zeros(shape, bool)
    for k, box in boxes.items():
        out[k] = box_region(np.asarray(box, float), shape[1:])
    return out


def assemble(masks: np.ndarray, ticks: np.ndarray, ious: dict[int, float], rules=None
             ) -> tuple[np.ndarray, np.ndarray, list]:
    """(bool label ``(Z, H, W)``, bool uncertain ``(Z, H, W)``, the per-slice records) of the
    stacked refined masks ``masks`` (rules in the module doc). ``ious``: predicted IoU of each
    slice that got a box (a ticked slice missing from it had none)."""
    from training import volume_pseudo_labels as vpl

    rules = rules if rules is not None else vpl.UncertainRules()
    masks = np.asarray(masks, bool)
    ticks = np.asarray(ticks, bool)
    if ticks.shape != (len(masks),):
        raise ValueError(f"ticks {ticks.shape} do not fit the masks {masks.shape}")
    label = masks & ticks[:, None, None]                 # a slice ticked absent is background
    records = [vpl.SliceRecord(int(k), float(ious.get(int(k), 0.0)), int(label[k].sum()), SOURCE)
               for k in np.flatnonzero(ticks)]
    uncertain = vpl.uncertain_mask(label, records, (), (0, len(masks) - 1), rules)
    for r in records:
        if r.area == 0:                                  # ticked present, nothing found
            uncertain[r.slice_index] = True
    uncertain[~ticks] = False                            # ticked absent: certain background
    return label, uncertain, records


# --------------------------------------------------------------------------- classifier
@dataclass(frozen=True)
class ClassifierConfig:
    size: int = 128
    channels: tuple[int, ...] = (16, 32, 64, 64)
    strides: tuple[int, ...] = (2, 2, 2, 1)      # 128 -> 16x16 CAM
    iterations: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    gain: float = 0.1
    offset: float = 0.05
    shift_px: int = 8
    seed: int = 0
    threads: int = 1
    window: str = "served"                      # or "volume": see classifier_volume


WINDOWS = ("served", "volume")


def classifier_volume(volume: Volume, window: str = "served") -> Volume:
    """The volume the classifier sees: ``volume`` itself (``"served"``), or (``"volume"``) the
    same voxels under its one window, also where the gateway windows each slice by its own
    percentiles (then ``volume.window`` holds the volume's 0.5-99.5 percentiles)."""
    from dataclasses import replace

    from service.core.volume import SLICE_PERCENTILES

    if window not in WINDOWS:
        raise ValueError(f"unknown classifier window {window!r}; choose one of {WINDOWS}")
    if window == "served" or volume.window_source != SLICE_PERCENTILES:
        return volume
    return replace(volume, window_source="volume percentiles")


class SliceClassifier(torch.nn.Module):
    """Conv blocks (``features``) -> global average pooling -> ``fc`` (one logit: present)."""

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 64), strides: Sequence[int] = (2, 2, 2, 1)) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        if len(channels) != len(strides):
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} differ in length")
        blocks, c_in = [], 1
        for c, s in zip(channels, strides):
            blocks.append(Convolution(2, c_in, c, strides=s, kernel_size=3, act="RELU", norm="BATCH"))
            c_in = c
        self.features = torch.nn.Sequential(*blocks)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


@dataclass
class Classifier:
    model: SliceClassifier
    config: ClassifierConfig
    seconds: float
    cpu_seconds: float
    history: list[float] = field(default_factory=list)
    train_accuracy: float = float("nan")     # on the ticks it was trained on (all slices)


def _augment(x: torch.Tensor, cfg: ClassifierConfig, g: torch.Generator) -> torch.Tensor:
    n = len(x)
    gain = 1 + (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * cfg.gain
    offset = (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1) * cfg.offset
    x = x * gain + offset
    if cfg.shift_px:
        shifts = torch.randint(-cfg.shift_px, cfg.shift_px + 1, (n, 2), generator=g)
        x = torch.stack([torch.roll(x[i], (int(dy), int(dx)), dims=(1, 2)) for i, (dy, dx) in enumerate(shifts)])
    return x


def train_classifier(inputs: torch.Tensor, ticks: np.ndarray, cfg: ClassifierConfig = ClassifierConfig()
                     ) -> Classifier:
    """Train a :class:`SliceClassifier` on float32 ``(Z, 1, S, S)`` served inputs and their bool
    ``(Z,)`` ticks (BCE, balanced batches, augmentation: module doc)."""
    ticks = np.asarray(ticks, bool)
    if len(ticks) != len(inputs):
        raise ValueError(f"{len(ticks)} ticks for {len(inputs)} slices")
    if ticks.all() or not ticks.any():
        raise ValueError("the ticks need slices of both kinds (present and absent)")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = SliceClassifier(cfg.channels, cfg.strides)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    present = torch.as_tensor(np.flatnonzero(ticks))
    absent = torch.as_tensor(np.flatnonzero(~ticks))
    target = torch.as_tensor(ticks, dtype=torch.float32)
    half = max(1, cfg.batch_size // 2)
    history = []
    t0, c0 = time.perf_counter(), time.process_time()
    model.train()
    for _ in range(cfg.iterations):
        idx = torch.cat([present[torch.randint(len(present), (half,), generator=g)],
                         absent[torch.randint(len(absent), (cfg.batch_size - half,), generator=g)]])
        x = _augment(inputs[idx], cfg, g)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)[:, 0], target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(inputs[i:i + 32])[:, 0] for i in range(0, len(inputs), 32)])
    accuracy = float(((logits > 0).numpy() == ticks).mean())
    return Classifier(model, cfg, seconds, cpu, history, accuracy)


def class_activation_maps(model: SliceClassifier, inputs: torch.Tensor, batch: int = 16) -> np.ndarray:
    """float32 ``(N, S, S)``: MONAI's CAM of the "present" logit on the ``features`` layer,
    weights without the bias, upsampled to the model frame (module doc), not normalised."""
    from monai.visualize import CAM

    weight = model.fc.weight.detach()
    cam = CAM(model, target_layers="features",
              fc_layers=lambda m: (lambda a: torch.nn.functional.linear(a, weight)),
              postprocessing=lambda x: x)
    out = []
    for i in range(0, len(inputs), batch):
        with torch.no_grad():
            out.append(cam(inputs[i:i + batch])[:, 0].detach().numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, *inputs.shape[-2:]), np.float32)


def slice_cams(model: SliceClassifier, volume: Volume, ks: Sequence[int], size: int) -> dict[int, np.ndarray]:
    """Slice ``k`` -> float32 ``(H, W)`` CAM in its model-orientation pixels (letterbox undone)."""
    from service.core.geometry import upsample_logits
    from service.core.segmenter_io import preprocess
    from training.volume_training import served_inputs

    ks = list(ks)
    if not ks:
        return {}
    frame = preprocess(volume.slice_pixels(ks[0]), size)[1]
    cams = class_activation_maps(model, served_inputs(volume, ks, size))
    return {k: upsample_logits(cams[i:i + 1], frame)[0] for i, k in enumerate(ks)}


# --------------------------------------------------------------------------- refine with LiteMedSAM
def refine(predictor, volume: Volume, boxes: dict[int, tuple[int, int, int, int]]
           ) -> tuple[np.ndarray, dict[int, float]]:
    """(bool ``(Z, H, W)`` masks, slice -> predicted IoU): the served LiteMedSAM prompted with
    each slice's box (model-orientation pixels), its mask kept inside the box."""
    from service.core.domain import Box, Prompt
    from training.pseudo_labels import box_region

    masks = np.zeros((volume.depth, *volume.slice_shape), bool)
    ious: dict[int, float] = {}
    for k, box in sorted(boxes.items()):
        embedding = predictor.embed(volume.slice_pixels(k))
        low, iou = predictor.predict(embedding, [Prompt(box=Box(*(float(v) for v in box)))])
        mask = predictor.masks(low, embedding.frame)[0]
        masks[k] = mask & box_region(np.asarray(box, float), mask.shape)
        ious[k] = float(iou[0])
    return masks, ious


# --------------------------------------------------------------------------- the label
@dataclass
class CamLabel:
    """A CAM pseudo-label: ``pl`` (a :class:`~training.volume_pseudo_labels.VolumePseudoLabel`,
    what :func:`save` writes), the ticks, the per-slice CAM boxes, the classifier, and the
    seconds of each step."""

    pl: object
    ticks: np.ndarray
    boxes: dict[int, tuple[int, int, int, int]]
    classifier: Classifier
    cam_seconds: float
    sam_seconds: float
    threshold: float
    margin: float
    cam_cpu_seconds: float = 0.0        # CPU time of this process (LiteMedSAM's runtime threads included)
    sam_cpu_seconds: float = 0.0

    @property
    def box_only(self) -> np.ndarray:
        """bool ``(Z, H, W)`` model orientation: the CAM boxes filled (:func:`box_masks`)."""
        return box_masks(self.pl.masks.shape, self.boxes)


def cam_pseudo_label(predictor, volume: Volume, ticks: np.ndarray, name: str = "structure",
                     cfg: ClassifierConfig = ClassifierConfig(), threshold: float = CAM_THRESHOLD,
                     margin: float = BOX_MARGIN, rules=None) -> CamLabel:
    """One structure's pseudo-label from its slice ticks (bool ``(Z,)``, model orientation):
    classifier, CAM boxes of the ticked slices, LiteMedSAM inside each box (module doc)."""
    from training import volume_pseudo_labels as vpl
    from training.volume_training import served_inputs

    rules = rules if rules is not None else vpl.UncertainRules()
    ticks = np.asarray(ticks, bool)
    if ticks.shape != (volume.depth,):
        raise ValueError(f"{ticks.shape} ticks for a volume of {volume.depth} slices")
    seen = classifier_volume(volume, cfg.window)
    classifier = train_classifier(served_inputs(seen, range(volume.depth), cfg.size), ticks, cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    present = [int(k) for k in np.flatnonzero(ticks)]
    cams = slice_cams(classifier.model, seen, present, cfg.size)
    boxes = {k: b for k, b in ((k, cam_box(cams[k], threshold, margin)) for k in present) if b is not None}
    cam_seconds, cam_cpu = time.perf_counter() - t0, time.process_time() - c0
    t0, c0 = time.perf_counter(), time.process_time()
    masks, ious = refine(predictor, volume, boxes)
    sam_seconds, sam_cpu = time.perf_counter() - t0, time.process_time() - c0
    label, uncertain, records = assemble(masks, ticks, ious, rules)
    extent = vpl.extent(ticks[:, None, None])
    pl = vpl.VolumePseudoLabel(
        name, volume.mask_array({k: label[k] for k in range(volume.depth) if label[k].any()}),
        volume.mask_array({k: uncertain[k] for k in range(volume.depth) if uncertain[k].any()}).astype(bool),
        np.asarray(volume.affine, np.float64), tuple(records), (), tuple(sorted(boxes)),
        tuple(tuple(float(v) for v in boxes[k]) for k in sorted(boxes)), (0, volume.depth - 1), extent,
        {"method": "cam", "cam_threshold": threshold, "box_margin": margin, "classifier_window": cfg.window,
         **asdict(rules)},
        cam_seconds + sam_seconds, label)
    return CamLabel(pl, ticks, boxes, classifier, cam_seconds, sam_seconds, threshold, margin, cam_cpu, sam_cpu)


def save(cl: CamLabel, folder: Path) -> Path:
    """:func:`training.volume_pseudo_labels.save` of ``cl.pl``, plus a ``cam`` entry in its JSON."""
    from training import volume_pseudo_labels as vpl

    path = vpl.save(cl.pl, folder)
    meta = json.loads(path.read_text())
    c = cl.classifier
    meta["cam"] = {"ticks_present": [int(k) for k in np.flatnonzero(cl.ticks)], "slices": int(len(cl.ticks)),
                   "threshold": cl.threshold, "margin": cl.margin,
                   "classifier": {**asdict(c.config), "seconds": c.seconds, "cpu_seconds": c.cpu_seconds,
                                  "train_accuracy": c.train_accuracy,
                                  "final_loss": float(np.mean(c.history[-20:])) if c.history else None},
                   "cam_seconds": cl.cam_seconds, "sam_seconds": cl.sam_seconds,
                   "cam_cpu_seconds": cl.cam_cpu_seconds, "sam_cpu_seconds": cl.sam_cpu_seconds}
    path.write_text(json.dumps(meta, indent=1))
    return path
