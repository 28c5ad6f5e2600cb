"""Full supervision vs one-box volume pseudo-labels, trained on the slices of one volume and
evaluated in 3-D on a held-out structure (training/volume_training.py).

Split: the *hemisphere split* of colin27_t1 (``volume_training.hemisphere_ranges``). For each
bilateral structure, training sees only the left hemisphere (voxels x < 90, a crop of the
volume: the left structure, labelled) and evaluation only the right one (x > 90: the right
structure, never labelled nor seen, whole); the middle column is in neither. Same subject,
so it is optimistic against other subjects, but no evaluated voxel was labelled.

Methods, all with the same network, iterations, batch, seed and augmentation:

* ``full`` (the issue's (a)): the reference masks of the training hemisphere's slices, MONAI DiceCE;
* ``full_ce``: the same reference through the partial cross-entropy the pseudo-label uses (separates
  the label from the loss);
* ``pseudo`` (the issue's (b)): one box on the left structure's slice of largest area of the whole
  volume, propagated by the served LiteMedSAM (training/volume_pseudo_labels.py), the label then
  cropped to the training hemisphere; uncertain voxels ignored.

Writes ``WORK/results.json`` and the table between the ``volume_training`` markers of
docs/TRAINING.md; resumes (pseudo-labels and checkpoints in ``WORK`` are reused)::

    .venv/bin/python bench/volume_training.py --structures thalamus,putamen,caudate,pallidum,amygdala --iterations 500
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

from training import volume_pseudo_labels as vpl  # noqa: E402
from training import volume_training as vt  # noqa: E402
from training.experiment import write_block  # noqa: E402
from training.train import TrainConfig  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
CASE = SHARED / "volumes" / "colin27_t1"
SECTION = "volume_training"
SETTINGS = ("threads", "seed", "iterations", "batch_size", "size")   # in the header, kept in results.json


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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


def pseudo_label(work: Path, files: dict[str, Path], structure: str, key_slices: int, predictor_box: list):
    """(1/0/-1 map of the training hemisphere, the pseudo-label, its bool label there). The annotator's box goes on the
    whole volume (as a person draws it, with the whole scan as LiteMedSAM's context); the saved
    label and uncertain files are then cropped to the training hemisphere like the image."""
    import shutil

    whole, folder, name = work / f"pseudo_{key_slices}key_whole", work / f"pseudo_{key_slices}key", f"{structure}_left"
    if not (whole / f"{name}.json").is_file():
        if not predictor_box:
            from service.inference.predictor import SamPredictor

            predictor_box.append(SamPredictor.from_repository(REPO / "model_repository", "medsam_lite", threads=2))
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


def table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| structure | method | train slices (with fg) | ignored | 3-D Dice | NSD 2 mm | predicted / reference "
             "voxels | fraction of full Dice: (a) / (a') | training s (wall / CPU) | iterations |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    full = {m: {r["structure"]: r["dice"] for r in rows if r["method"] == m} for m in ("full", "full_ce")}

    def fraction(r: dict, method: str) -> str:
        base = full[method].get(r["structure"])   # a base that failed (Dice < 0.1) divides nothing
        return f"{r['dice'] / base:.2f}" if base is not None and base >= 0.1 else "n/a"

    for r in rows:
        lines.append(f"| {r['structure']} | {r['label']} | {r['slices']} ({r['fg_slices']}) | {r['ignored']:.3f} | "
                     f"{r['dice']:.3f} | {r['nsd']:.3f} | {r['predicted_voxels']} / {r['reference_voxels']} | "
                     f"{fraction(r, 'full')} / {fraction(r, 'full_ce')} | "
                     f"{r['seconds']:.0f} / {r['cpu_seconds']:.0f} | {r['iterations']} |")
    labels = [r for r in rows if r["method"].startswith("pseudo")]
    if labels:
        lines += ["", "| structure | key slice(s) | pseudo-label 3-D Dice on the training structure "
                      "(left hemisphere) | uncertain fraction of label ∪ reference | propagation s (whole volume) |",
                  "|---|---|---|---|---|"]
        for r in labels:
            lines.append(f"| {r['structure']} | {r['key_slices']} | {r['label_dice']:.3f} | "
                         f"{r['unc_in_union']:.2f} | {r['label_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", default="thalamus,putamen,caudate,pallidum,amygdala")
    p.add_argument("--methods", default="full,full_ce,pseudo")
    p.add_argument("--key-slices", default="1", help="comma list: pseudo-labels from this many key slices")
    p.add_argument("--iterations", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
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
    rows, predictor_box = [], []
    for structure in args.structures.split(","):
        work = args.work / structure
        files = crops(args.work, structure)
        train_volume = vt.read_volume(files["image_left"])
        eval_volume = vt.read_volume(files["image_right"])
        reference_train = vt.model_masks(files["mask_left"], train_volume)
        reference_eval = vt.model_masks(files["mask_right"], eval_volume)
        runs = []
        for method in args.methods.split(","):
            if method == "pseudo":
                runs += [(f"pseudo_{n}key", int(n)) for n in args.key_slices.split(",")]
            else:
                runs.append((method, 0))
        for run, n in runs:
            extra = {}
            if n:
                labels, pl, fg = pseudo_label(args.work, files, structure, n, predictor_box)
                extra = {"key_slices": list(pl.key_slices), "label_dice": dice(fg, reference_train),
                         "unc_in_union": float((labels[fg | reference_train] < 0).mean()),
                         "label_seconds": pl.seconds}
                method = "pseudo"
            else:
                labels, method = vt.label_map(reference_train), run
            cfg = TrainConfig(structure=structure, size=args.size, iterations=args.iterations,
                              batch_size=args.batch_size, seed=args.seed, threads=args.threads)
            result = vt.train_volume(cfg, train_volume, labels, method, work / run,
                                     source={"volume": str(files["image_left"])}, progress=False)
            record = json.loads((work / run / vt.RUN_FILE).read_text())
            score = vt.evaluate_volume(result.model, eval_volume, reference_eval, args.size)
            label = {"full": "(a) full reference masks", "full_ce": "(a') reference, partial CE",
                     "pseudo": f"(b) one-box pseudo-label ({n} key slice{'s' if n > 1 else ''})"}[method]
            row = {"structure": structure, "method": run, "label": label, "slices": len(record["slices"]),
                   "fg_slices": len(record["foreground_slices"]), "ignored": record["ignored_fraction"],
                   "dice": score.dice, "nsd": score.nsd, "predicted_voxels": score.predicted_voxels,
                   "reference_voxels": score.reference_voxels, "seconds": result.seconds,
                   "cpu_seconds": result.cpu_seconds, "iterations": result.iterations, **extra}
            print(json.dumps(row), flush=True)
            rows.append(row)
            write(args, argv, started, rows, torch.__version__)
    print(write(args, argv, started, rows, torch.__version__))
    return 0


def write(args: argparse.Namespace, argv: list[str] | None, started: str, rows: list[dict], torch_version: str) -> str:
    """``WORK/results.json`` and the doc block of the rows so far; returns the block."""
    args.work.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        settings = {k: getattr(args, k) for k in SETTINGS}
        (args.work / "results.json").write_text(json.dumps({"argv": argv or sys.argv[1:], "started": started,
                                                            "torch": torch_version, "settings": settings,
                                                            "rows": rows}, indent=1) + "\n")
    command = ".venv/bin/python bench/volume_training.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    header = (f"Measured by `{command}` on {platform.node()} ({cpu_name()}, {args.threads} thread{'s' if args.threads != 1 else ''}, "
              f"torch {torch_version}), started {started}; one seed ({args.seed}), {args.iterations} iterations "
              f"of batch {args.batch_size} at {args.size}x{args.size}. Train: left hemisphere of colin27_t1 (x < 90), "
              f"its left structure; evaluate: right hemisphere (x > 90), the whole right structure.")
    block = table(rows, header)
    if not args.no_doc:
        write_block(args.doc, block, SECTION)
    return block


if __name__ == "__main__":
    raise SystemExit(main())
