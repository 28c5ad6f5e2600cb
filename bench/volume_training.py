"""Full supervision vs one-box volume pseudo-labels vs per-slice boxes, trained on the slices of
one volume and evaluated in 3-D on a held-out structure (training/volume_training.py), over seeds,
with an annotation-cost table.

Split: the *hemisphere split* of colin27_t1 (``volume_training.hemisphere_ranges``). For each
bilateral structure, training sees only the left hemisphere (voxels x < 90, a crop of the
volume: the left structure, labelled) and evaluation only the right one (x > 90: the right
structure, never labelled nor seen, whole); the middle column is in neither. Same subject,
so it is optimistic against other subjects, but no evaluated voxel was labelled.

Methods (``--methods``), all with the same network, iterations, batch and augmentation, each
trained once per seed of ``--seeds`` (seed = initial weights, batch order, augmentation):

* ``full`` (the issue's (a)): the reference masks of the training hemisphere's slices, CE + batch
  soft Dice over the labelled pixels (the trainer's ``dice_ce``; only the padding is ignored);
* ``pseudo`` (the issue's (b)): one box (``--key-slices``: or several) on the left structure's slice
  of largest area of the whole volume, propagated by the served LiteMedSAM
  (training/volume_pseudo_labels.py), the label then cropped to the training hemisphere; the same
  loss as ``full``, uncertain voxels ignored. Pseudo-labels do not depend on the seed: made once,
  cached in ``WORK/pseudo_*key_whole``;
* ``boxes`` (the issue's (c)): the reference's bounding box on every slice of the training
  structure (an annotator boxing each slice), the trainer's ``box_size`` (tightness prior + box fill);
* ``pseudo`` with ``--key-slices every`` ((c'), run ``pseudo_everykey``): the same boxes, each slice
  LiteMedSAM inside its own box (the seeds' box -> SAM label; ``volume_pseudo_labels.EVERY_SLICE``:
  nothing propagated, beyond the boxed slices background), then the loss of (b);
* ``full_ce`` / ``pseudo_ce``: the same labels as ``full`` / ``pseudo`` through partial CE only
  (controls: the loss the first measurement used).

2.5-D (``--context-slices c`` > 0): the runs named in ``--context-runs`` (default ``full`` and
``pseudo_1key``) are trained once more with the slice and ``c`` neighbours on each side as input
channels (run ``RUN_ctxC``; same labels, network but for its first layer, iterations and seeds);
their "fraction of full" is against (a) with the same context.

Writes ``WORK/results.json`` (one row per run and seed) and, between the ``volume_training``
markers of docs/TRAINING.md, the table (mean ± sd over seeds), the pseudo-labels' quality and the
annotation cost (:data:`ANNOTATION_SECONDS`); resumes (pseudo-labels and checkpoints in ``WORK``
are reused, finished runs re-evaluated)::

    .venv/bin/python bench/volume_training.py --structures thalamus,putamen,caudate --iterations 300 \
        --threads 1 --key-slices 1,3 --seeds 0,1,2 --context-slices 1 --work runs/volume_training_s3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from bench.measure import cpu_name  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training import volume_training as vt  # noqa: E402
from training.experiment import write_block  # noqa: E402
from training.model import NetworkConfig  # noqa: E402
from training.train import TrainConfig  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
CASE = SHARED / "volumes" / "colin27_t1"
SECTION = "volume_training"
SETTINGS = ("threads", "seeds", "iterations", "batch_size", "size", "context_slices", "context_runs")   # in the header, kept in results.json
LABELS = {"full": "(a) full reference masks", "pseudo": "(b) one-box pseudo-label",
          "boxes": "(c) box on every slice", "scribbles": "(d) scribbles on every kept slice", "full_ce": "(a') reference, partial CE only",
          "pseudo_ce": "(b') one-box pseudo-label, partial CE only"}
# --key-slices every: the reference's box on every slice of the structure, LiteMedSAM inside each
# (nothing propagated), the same loss as (b)
EVERY_SLICE_LABELS = {"pseudo": "(c') box on every slice -> LiteMedSAM pseudo-label",
                      "pseudo_ce": "(c'') box on every slice -> LiteMedSAM pseudo-label, partial CE only"}

# Seconds per annotation: published figures for *natural* images (PASCAL VOC, ILSVRC, COCO). Outlining a
# structure on a medical slice is typically slower; the table uses them only to compare methods.
# name -> (fast, usual) seconds, source
ANNOTATION_SECONDS = {
    # Papadopoulos, Uijlings, Keller, Ferrari, "Extreme clicking for efficient object annotation", ICCV 2017,
    # abstract: 7 s per box by extreme clicking (PASCAL VOC), against 35 s for one high-quality box drawn the
    # traditional way (annotating ILSVRC, their reference [62]).
    "box": (7.0, 35.0),
    # Bearman, Russakovsky, Ferrari, Fei-Fei, "What's the point: semantic segmentation with point supervision",
    # ECCV 2016, introduction: "an accurate outline of a single object takes between 54 s and 79 s" (their
    # references [13] and [5], COCO). (Their full per-pixel annotation of a whole PASCAL VOC image: 239.7 s.)
    "outline": (54.0, 79.0),
    # No per-slice scribble time is used: none was checked against its source here ((d) is not costed).
}


def crops(work: Path, structure: str) -> dict[str, Path]:
    """The left-hemisphere image and mask (training), the right ones (evaluation)."""
    import nibabel as nib

    nx = nib.load(str(CASE / "image.nii.gz")).shape[0]
    left, right = vt.hemisphere_ranges(nx)
    out = {}
    for side, xr in (("left", left), ("right", right)):
        image = work / f"image_{side}.nii.gz"
        if not image.is_file():
            vt.crop_nifti(CASE / "image.nii.gz", image, x=xr)
        mask = work / f"{structure}_{side}.nii.gz"
        if not mask.is_file():
            vt.crop_nifti(CASE / "masks" / f"{structure}_{side}.nii.gz", mask, x=xr)
        out[f"image_{side}"], out[f"mask_{side}"], out[f"x_{side}"] = image, mask, xr
    return out


def pseudo_label(work: Path, files: dict[str, Path], structure: str, key_slices: int, predictor_box: list,
                 threads: int = 2):
    """(1/0/-1 map of the training hemisphere, the pseudo-label, its bool label there). The annotator's box goes on the
    whole volume (as a person draws it, with the whole scan as LiteMedSAM's context); the saved
    label and uncertain files are then cropped to the training hemisphere like the image."""
    import shutil

    tag = key_tag(key_slices)
    whole, folder, name = work / f"pseudo_{tag}key_whole", work / f"pseudo_{tag}key", f"{structure}_left"
    if not (whole / f"{name}.json").is_file():
        if not predictor_box:
            from service.inference.predictor import SamPredictor

            predictor_box.append(SamPredictor.from_repository(REPO / "model_repository", "medsam_lite",
                                                              threads=threads))
        pl = vpl.volume_pseudo_label(predictor_box[0], vt.read_volume(CASE / "image.nii.gz"),
                                     vt.read_volume(CASE / "masks" / f"{name}.nii.gz"), key_slices=key_slices,
                                     name=name)
        vpl.save(pl, whole)
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("label", "uncertain"):
        vt.crop_nifti(whole / f"{name}_{suffix}.nii.gz", folder / f"{name}_{suffix}.nii.gz", x=files["x_left"])
    shutil.copy(whole / f"{name}.json", folder / f"{name}.json")
    volume = vt.read_volume(files["image_left"])
    labels, pl = vt.pseudo_label_map(folder, name, volume)
    return labels, pl, vt.model_masks(folder / f"{name}_label.nii.gz", volume)


def key_tag(key_slices: int) -> str:
    """How a key-slice count appears in run and folder names: ``3``, or ``every``."""
    return "every" if key_slices == vpl.EVERY_SLICE else str(key_slices)


def annotations(method: str, key_slices: int, reference_slices: int) -> tuple[str, int]:
    """(kind of :data:`ANNOTATION_SECONDS`, how many) a method's labels cost an annotator on the
    training structure that spans ``reference_slices`` slices."""
    if method in ("full", "full_ce"):
        return "outline", reference_slices
    if method in ("pseudo", "pseudo_ce"):
        return "box", reference_slices if key_slices == vpl.EVERY_SLICE else key_slices
    if method == "scribbles":
        return "scribble", reference_slices
    return "box", reference_slices


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value)."""
    values = np.asarray(values, float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per (structure, run) from the per-seed rows, in the order of first appearance of
    the structure, then of the run: means, sample sd and per-seed values."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["structure"], r["run"]), []).append(r)
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    out = []
    for key in sorted(groups, key=lambda k: (structures.index(k[0]), runs.index(k[1]))):
        seeds = sorted(groups[key], key=lambda r: r["seed"])
        first = seeds[0]
        agg = {k: first[k] for k in ("structure", "run", "method", "key_slices", "label", "slices", "fg_slices",
                                     "ignored", "reference_voxels", "reference_slices", "iterations")}
        agg["context_slices"] = first.get("context_slices", 0)
        agg["seeds"] = [r["seed"] for r in seeds]
        for k in ("dice", "nsd"):
            agg[f"{k}_per_seed"] = [r[k] for r in seeds]
            agg[f"{k}_mean"], agg[f"{k}_sd"] = _mean_sd(agg[f"{k}_per_seed"])
        for k in ("predicted_voxels", "seconds", "cpu_seconds"):
            agg[k] = float(np.mean([r[k] for r in seeds]))
        out.append(agg)
    return out


def per_seed(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def fraction(agg: dict, base: dict | None) -> str:
    """mean(method) / mean(base) of the 3-D Dice; "n/a" without a base or with one that failed
    (mean Dice < 0.1 divides nothing)."""
    if base is None or base["dice_mean"] < 0.1:
        return "n/a"
    return f"{agg['dice_mean'] / base['dice_mean']:.2f}"


def table(rows: list[dict], header: str) -> str:
    """The doc block: results over seeds, the pseudo-labels' quality, the annotation cost."""
    aggs = aggregate(rows)
    base = {m: {(a["structure"], a.get("context_slices", 0)): a for a in aggs if a["method"] == m and
                (a["run"] == m or a["run"].startswith(m + "_ctx"))} for m in ("full", "full_ce")}
    lines = [header, "",
             "| structure | method | seeds | train slices (with fg) | ignored | 3-D Dice mean ± sd | Dice per seed "
             "| NSD 2 mm mean ± sd | NSD per seed | predicted / reference voxels (mean) "
             "| fraction of full: (a) / (a') | training s per run (wall / CPU) | iterations |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in aggs:
        lines.append(f"| {a['structure']} | {a['label']} | {len(a['seeds'])} | {a['slices']} ({a['fg_slices']}) | "
                     f"{a['ignored']:.3f} | {a['dice_mean']:.3f} ± {a['dice_sd']:.3f} | "
                     f"{per_seed(a['dice_per_seed'])} | {a['nsd_mean']:.3f} ± {a['nsd_sd']:.3f} | "
                     f"{per_seed(a['nsd_per_seed'])} | "
                     f"{a['predicted_voxels']:.0f} / {a['reference_voxels']} | "
                     f"{fraction(a, base['full'].get((a['structure'], a.get('context_slices', 0))))} / "
                     f"{fraction(a, base['full_ce'].get((a['structure'], a.get('context_slices', 0))))} | "
                     f"{a['seconds']:.0f} / {a['cpu_seconds']:.0f} | {a['iterations']} |")
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    labels = {(r["structure"], r["key_slices"]): r for r in rows if r["method"] in ("pseudo", "pseudo_ce")}
    labels = {k: labels[k] for k in sorted(labels, key=lambda k: (structures.index(k[0]), k[1]))}
    if labels:
        lines += ["", "| structure | key slice(s) | pseudo-label 3-D Dice on the training structure "
                      "(left hemisphere) | uncertain fraction of label ∪ reference | propagation s (whole volume) |",
                  "|---|---|---|---|---|"]
        for r in labels.values():
            keys = (f"every slice ({len(r['key_slice_indices'])})" if r["key_slices"] == vpl.EVERY_SLICE
                    else r["key_slice_indices"])
            lines.append(f"| {r['structure']} | {keys} | {r['label_dice']:.3f} | "
                         f"{r['unc_in_union']:.2f} | {r['label_seconds']:.1f} |")
    lines += ["", "| structure | method | annotations | s per annotation (fast – usual) | annotator minutes "
                  "(fast – usual) | 3-D Dice (mean) | Dice per annotator minute (usual) |",
              "|---|---|---|---|---|---|---|"]
    for a in aggs:
        kind, n = annotations(a["method"], a["key_slices"], a["reference_slices"])
        if kind not in ANNOTATION_SECONDS:   # no figure checked against its source: not costed
            lines.append(f"| {a['structure']} | {a['label']} | {kind}s on {n} slices | no checked published "
                         f"figure | – | {a['dice_mean']:.3f} | – |")
            continue
        fast, usual = ANNOTATION_SECONDS[kind]
        what = {"outline": f"outlines of {n} slices", "box": f"{n} box{'es' if n > 1 else ''}"}[kind]
        if a["method"] == "boxes" or a["key_slices"] == vpl.EVERY_SLICE:
            what = f"a box on each of {n} slices"
        lines.append(f"| {a['structure']} | {a['label']} | {what} | {fast:g} – {usual:g} | "
                     f"{n * fast / 60:.1f} – {n * usual / 60:.1f} | {a['dice_mean']:.3f} | "
                     f"{a['dice_mean'] / (n * usual / 60):.3f} |")
    fast, usual = ANNOTATION_SECONDS["box"]
    for r in interactive_rows(structures):
        n = r["n"]
        lines.append(f"| {r['structure']} | {r['label']} | {n} box{'es' if n > 1 else ''} | {fast:g} – {usual:g} | "
                     f"{n * fast / 60:.1f} – {n * usual / 60:.1f} | {r['dice']:.3f} | {r['dice'] / (n * usual / 60):.3f} |")
    return "\n".join(lines)


VOLUMES_RESULTS = REPO / "bench" / "volumes_results.json"   # bench/evaluate_volumes.py's rows


def interactive_rows(structures: list[str], path: Path = VOLUMES_RESULTS) -> list[dict]:
    """The gateway's own interactive 3-D path on each structure's evaluation side (colin27's right
    structure), from bench/evaluate_volumes.py's results: one box, and one box + its corrections
    (each a reference box on the worst slice, or an erase: counted at a box's cost). Nothing is
    trained: the person annotates the very volume that is segmented. Empty without that file."""
    if not path.is_file():
        return []
    volumes = json.loads(path.read_text()).get("volumes", {})
    rows = volumes.get("colin27_t1 (NIfTI)", {}).get("structures", {})
    out = []
    for name in structures:
        r = rows.get(f"{name}_right")
        if r is None:
            continue
        out.append({"structure": name, "label": "interactive 3-D, one box (gateway, no training)", "n": 1,
                    "dice": r["one_box_dice"]})
        n = len(r["steps"])
        out.append({"structure": name, "label": f"interactive 3-D, one box + {n - 1} corrections (gateway, no training)",
                    "n": n, "dice": r["corrected_dice"]})
    return out


def run_list(methods: str, key_slices: str) -> list[tuple[str, str, int]]:
    """(run name, volume method, key slices) in ``--methods`` order; a pseudo method once per
    ``--key-slices`` value."""
    out = []
    for method in methods.split(","):
        if method not in vt.METHODS:
            raise SystemExit(f"unknown method {method!r}; choose from {', '.join(vt.METHODS)}")
        if method in vt.PSEUDO_METHODS:
            for n in key_slices.split(","):
                count = vpl.EVERY_SLICE if n == "every" else int(n)
                out.append((f"{method}_{key_tag(count)}key", method, count))
        else:
            out.append((method, method, 0))
    return out


class Structure:
    """One structure's volumes, references and (lazily, once) pseudo-label maps."""

    def __init__(self, work: Path, name: str) -> None:
        self.work, self.name = work, name
        self.files = crops(work, name)
        self.train_volume = vt.read_volume(self.files["image_left"])
        self.eval_volume = vt.read_volume(self.files["image_right"])
        self.reference_train = vt.model_masks(self.files["mask_left"], self.train_volume)
        self.reference_eval = vt.model_masks(self.files["mask_right"], self.eval_volume)
        self.reference_slices = int(self.reference_train.reshape(len(self.reference_train), -1).any(axis=1).sum())
        self._pseudo: dict[int, tuple] = {}

    def labels(self, key_slices: int, predictor_box: list, threads: int) -> tuple[np.ndarray, dict]:
        """(1/0/-1 map of the training hemisphere, the label's quality) for a pseudo method with
        ``key_slices``, or the reference map (and {}) for 0."""
        if not key_slices:
            return vt.label_map(self.reference_train), {}
        if key_slices not in self._pseudo:
            labels, pl, fg = pseudo_label(self.work, self.files, self.name, key_slices, predictor_box, threads)
            self._pseudo[key_slices] = labels, {
                "key_slice_indices": list(pl.key_slices), "label_dice": dice(fg, self.reference_train),
                "unc_in_union": float((labels[fg | self.reference_train] < 0).mean()), "label_seconds": pl.seconds}
        return self._pseudo[key_slices]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", default="thalamus,putamen,caudate")
    p.add_argument("--methods", default="full,pseudo,boxes,scribbles,full_ce,pseudo_ce",
                   help=f"comma list of {', '.join(vt.METHODS)}")
    p.add_argument("--key-slices", default="1",
                   help="comma list: pseudo-labels from this many key slices (every: a box on every slice, (c'))")
    p.add_argument("--seeds", default="0", help="comma list: each run is trained once per seed")
    p.add_argument("--context-slices", type=int, default=0,
                   help="also train the --context-runs 2.5-D with this many neighbouring slices on each side")
    p.add_argument("--context-runs", default="full,pseudo_1key",
                   help="comma list of run names (full, pseudo_1key, boxes, ...) to repeat 2.5-D")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "volume_training")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "TRAINING.md")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--table-only", action="store_true", help="rewrite the doc block from WORK/results.json")
    args = p.parse_args(argv)
    import torch

    if args.table_only:
        saved = json.loads((args.work / "results.json").read_text())
        for key, value in saved["settings"].items():
            setattr(args, key, value)
        print(write(args, saved["argv"], saved["started"], saved["rows"], saved["torch"]))
        return 0

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, predictor_box, structures = [], [], {}
    runs = [(run, method, n, 0) for run, method, n in run_list(args.methods, args.key_slices)]
    if args.context_slices:
        known = {run: (method, n) for run, method, n, _ in runs}
        for run in args.context_runs.split(","):
            if run not in known:
                raise SystemExit(f"--context-runs: {run!r} is not one of this invocation's runs ({', '.join(known)})")
            runs.append((f"{run}_ctx{args.context_slices}", *known[run], args.context_slices))
    for run, method, n, context in runs:
        for name in args.structures.split(","):
            if name not in structures:
                structures[name] = Structure(args.work, name)
            s = structures[name]
            labels, quality = s.labels(n, predictor_box, args.threads)
            for seed in seeds:
                row = train_and_score(args, s, run, method, n, seed, labels, context)
                row.update(quality)
                print(json.dumps(row), flush=True)
                rows.append(row)
                write(args, argv, started, rows, torch.__version__)
    print(write(args, argv, started, rows, torch.__version__))
    return 0


def train_and_score(args: argparse.Namespace, s: Structure, run: str, method: str, key_slices: int, seed: int,
                    labels: np.ndarray, context: int = 0) -> dict:
    """Train (or resume) one run for one seed in ``WORK/STRUCTURE/RUN/seedN``; its 3-D scores
    (``context``: 2.5-D with that many neighbouring slices on each side)."""
    run_dir = args.work / s.name / run / f"seed{seed}"
    cfg = TrainConfig(structure=s.name, size=args.size, iterations=args.iterations, batch_size=args.batch_size,
                      seed=seed, threads=args.threads, network=NetworkConfig(context_slices=context))
    result = vt.train_volume(cfg, s.train_volume, labels, method, run_dir,
                             source={"volume": str(s.files["image_left"])}, progress=False)
    record = json.loads((run_dir / vt.RUN_FILE).read_text())
    score = vt.evaluate_volume(result.model, s.eval_volume, s.reference_eval, args.size, context=context)
    if key_slices == vpl.EVERY_SLICE:
        label = EVERY_SLICE_LABELS[method]
    else:
        label = LABELS[method] + (f" ({key_slices} key slice{'s' if key_slices > 1 else ''})" if key_slices else "")
    label += f", 2.5-D ({2 * context + 1} slices in)" if context else ""
    return {"structure": s.name, "run": run, "method": method, "key_slices": key_slices, "seed": seed,
            "context_slices": context,
            "label": label, "trainer_method": record["trainer_method"], "slices": len(record["slices"]),
            "fg_slices": len(record["foreground_slices"]), "ignored": record["ignored_fraction"],
            "reference_slices": s.reference_slices, "dice": score.dice, "nsd": score.nsd,
            "predicted_voxels": score.predicted_voxels, "reference_voxels": score.reference_voxels,
            "seconds": result.seconds, "cpu_seconds": result.cpu_seconds, "iterations": result.iterations}


def write(args: argparse.Namespace, argv: list[str] | None, started: str, rows: list[dict], torch_version: str) -> str:
    """``WORK/results.json`` and the doc block of the rows so far; returns the block."""
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        settings = {k: getattr(args, k) for k in SETTINGS}
        (args.work / "results.json").write_text(json.dumps({"argv": argv or sys.argv[1:], "started": started,
                                                            "torch": torch_version, "settings": settings,
                                                            "rows": rows}, indent=1) + "\n")
    command = ".venv/bin/python bench/volume_training.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    header = (f"Measured by `{command}` on {platform.node()} ({cpu_name()}, {threads}, "
              f"torch {torch_version}), started {started}; seeds {args.seeds} (mean ± sample sd over them), "
              f"{args.iterations} iterations of batch {args.batch_size} at {args.size}x{args.size}. Train: left "
              f"hemisphere of colin27_t1 (x < 90), its left structure; evaluate: right hemisphere (x > 90), the whole "
              f"right structure. Fraction of full = mean Dice of the method / mean Dice of (a) (or of (a')).")
    block = table(rows, header)
    if not args.no_doc:
        write_block(args.doc, block, SECTION)
    return block


if __name__ == "__main__":
    raise SystemExit(main())
