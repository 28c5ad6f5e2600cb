"""Seeded, resumable training of the U-Net from one kind of supervision.

Methods (the loss for a batch; all from :mod:`training.losses` except ``full``):

* ``full``: MONAI ``DiceCELoss`` on the reference masks (the upper bound);
* ``box``: box tightness prior (MIL over rows/columns) + background outside the boxes;
* ``box_size``: the same + ``size_weight`` * penalty when the area inside a box is below
  ``box_fill`` (0.4) of the box's (objects fill a good part of their tight box);
* ``box_pseudo``: LiteMedSAM pseudo-label CE + Dice (uncertain ignored) + the tightness prior;
* ``scribble``: partial cross-entropy on scribbles;
* ``points``: partial cross-entropy on the clicked points + ``size_weight`` * size penalty
  with bounds ``[lower, upper]`` (model-frame pixels) for images labelled "present" and
  ``[0, 0]`` for "absent" ones;
* ``dice_ce`` (not one of the 2-D experiment's :data:`METHODS`): partial cross-entropy +
  *batch* soft Dice of the foreground (:func:`training.losses.labelled_dice_ce_loss`) on a
  dense 1/0/-1 map in the ``scribbles`` channel, -1 ignored by both terms: a reference mask
  (padding -1) or a pseudo-label (uncertain -1) of a volume's slices, most of which show no
  foreground (:mod:`training.volume_training`). ``full`` stays the per-image DiceCE that the
  2-D experiment's results were measured with.

Everything random (initial weights, batches, augmentation) comes from ``seed``; the
checkpoint holds the model, the optimiser, the batch generator's state and the loss
history, so stopping after k iterations and resuming gives the same weights as an
uninterrupted run (up to floating-point non-associativity across thread counts).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from training import losses
from export.unet import network_from_checkpoint
from training.model import NetworkConfig, build_network
from training.samples import SampleSet, batch

log = logging.getLogger(__name__)

METHODS = ("full", "box", "box_size", "box_pseudo", "scribble", "points")   # the 2-D experiment's (its default)
DENSE_MAP_METHODS = ("dice_ce",)        # for 1/0/-1 maps of volume slices (training.volume_training)
ALL_METHODS = METHODS + DENSE_MAP_METHODS
CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class TrainConfig:
    method: str = "full"
    structure: str = "brain"
    size: int = 128
    iterations: int = 500
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100
    size_weight: float = 1.0
    size_lower: float = 0.0   # model-frame pixels; set from the data by `common_size_bounds`
    size_upper: float = 0.0
    box_fill: float = 0.4     # box_size: predicted area >= box_fill * box area
    augment: bool = True
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def __post_init__(self) -> None:
        if self.method not in ALL_METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {ALL_METHODS}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        network = NetworkConfig.from_dict(d.pop("network", {}))
        return cls(**d, network=network)


@dataclass
class TrainResult:
    model: torch.nn.Module
    history: list[float]
    iterations: int
    seconds: float      # wall clock of the training loop (all sessions of a resumed run)
    cpu_seconds: float  # CPU time of this process in the loop (less sensitive to a busy machine)


def common_size_bounds(samples: SampleSet, slack: float = 0.1) -> tuple[float, float]:
    """Kervadec's "common" bounds: ``[(1 - slack) min, (1 + slack) max]`` of the reference
    areas (model-frame pixels) over the samples where the structure is present. One pair of
    numbers per structure: the only size knowledge the point-supervised run gets."""
    areas = samples.areas[samples.present]
    if areas.numel() == 0:
        return 0.0, 0.0
    return float(areas.min()) * (1 - slack), float(areas.max()) * (1 + slack)


def batch_loss(cfg: TrainConfig, logits: torch.Tensor, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scalar loss of ``cfg.method`` for logits ``(B, 2, S, S)`` and a batch from :func:`batch`."""
    if cfg.method == "full":
        from monai.losses import DiceCELoss

        return DiceCELoss(to_onehot_y=True, softmax=True)(logits, b["masks"][:, None])
    if cfg.method == "box":
        return losses.tightness_prior_loss(logits, b["boxes"])
    if cfg.method == "box_size":
        return (losses.tightness_prior_loss(logits, b["boxes"])
                + cfg.size_weight * losses.box_fill_penalty(logits, b["boxes"], cfg.box_fill))
    if cfg.method == "box_pseudo":
        return losses.pseudo_label_loss(logits, b["pseudo"]) + losses.tightness_prior_loss(logits, b["boxes"])
    if cfg.method == "scribble":
        return losses.partial_cross_entropy(logits, b["scribbles"])
    if cfg.method == "dice_ce":
        return losses.labelled_dice_ce_loss(logits, b["scribbles"])
    present = b["present"].float()
    lower, upper = present * cfg.size_lower, present * cfg.size_upper
    return losses.partial_cross_entropy(logits, b["points"]) + cfg.size_weight * losses.size_penalty(logits, lower, upper)


def _lr(cfg: TrainConfig, iteration: int) -> float:
    """Polynomial decay (power 0.9), a function of the iteration only (so resuming matches)."""
    return cfg.lr * (1.0 - iteration / max(1, cfg.iterations)) ** 0.9


def save_checkpoint(path: Path, cfg: TrainConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    generator: torch.Generator, iteration: int, history: list[float], seconds: float,
                    cpu_seconds: float = 0.0) -> None:
    """Atomically write everything needed to resume (and to export: ``config`` + ``model``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": cfg.to_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "iteration": iteration, "history": history,
                "seconds": seconds, "cpu_seconds": cpu_seconds}, tmp)
    tmp.replace(path)


def load_model(path: Path) -> tuple[torch.nn.Module, TrainConfig]:
    """The trained network (eval mode) and its config from a checkpoint file."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    return network_from_checkpoint(state), TrainConfig.from_dict(state["config"])


def train(cfg: TrainConfig, samples: SampleSet, run_dir: Path, resume: bool = True,
          stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume from ``run_dir/checkpoint.pt``) up to ``cfg.iterations``.

    ``stop_after``: stop (with a checkpoint) once this many iterations are done, as an
    interrupted run would. Returns the model and the per-iteration loss history.
    """
    from tqdm import tqdm

    torch.set_num_threads(cfg.threads)
    model = build_network(cfg.network, cfg.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, history, seconds, cpu = 0, [], 0.0, 0.0
    path = run_dir / CHECKPOINT
    if resume and path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved = TrainConfig.from_dict(state["config"])
        if replace(saved, iterations=cfg.iterations, checkpoint_every=cfg.checkpoint_every) != cfg:
            raise ValueError(f"{path} was written with another configuration: {saved}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        start, history, seconds = int(state["iteration"]), list(state["history"]), float(state["seconds"])
        cpu = float(state.get("cpu_seconds", 0.0))
        log.info("resuming %s at iteration %d", run_dir, start)
    (run_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    end = cfg.iterations if stop_after is None else min(cfg.iterations, stop_after)
    model.train()
    bar = tqdm(range(start, end), initial=start, total=cfg.iterations, disable=not progress,
               desc=f"{cfg.structure}/{cfg.method}", leave=False, mininterval=2.0)
    t0, c0 = time.perf_counter(), time.process_time()
    for it in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr(cfg, it)
        b = batch(samples, generator, cfg.batch_size, cfg.augment)
        loss = batch_loss(cfg, model(b["images"]), b)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append(float(loss.detach()))
        if (it + 1) % 10 == 0:
            bar.set_postfix(loss=f"{sum(history[-10:]) / 10:.4f}")
        if (it + 1) % cfg.checkpoint_every == 0 and it + 1 < end:
            save_checkpoint(path, cfg, model, optimizer, generator, it + 1, history,
                            seconds + time.perf_counter() - t0, cpu + time.process_time() - c0)
    bar.close()
    seconds += time.perf_counter() - t0
    cpu += time.process_time() - c0
    done = len(history)
    save_checkpoint(path, cfg, model, optimizer, generator, done, history, seconds, cpu)
    return TrainResult(model.eval(), history, done, seconds, cpu)
