"""Image-level labels (slice ticks) -> classifier -> CAM boxes -> LiteMedSAM -> the U-Net, against
full supervision, in 3-D on a held-out hemisphere (training/cam_labels.py, issue 15 item 3).

Split: the hemisphere split of colin27_t1 (``volume_training.hemisphere_ranges``, as
bench/volume_training.py): everything of training (ticks, classifier, CAM, LiteMedSAM, the U-Net)
sees only the left-hemisphere crop (voxels x < 90) and its reference (``brain``: the one brain
mask cropped; a bilateral structure: its left mask); evaluation is on the right-hemisphere crop
(x > 90), never labelled nor seen. Same subject, so optimistic against other subjects.

Per structure: the ticks (slices of the left crop with any reference voxel) train the slice
classifier (seed 0), CAM boxes of the ticked slices prompt the served LiteMedSAM, and the
pseudo-label is saved as ``training.volume_pseudo_labels.save`` does (``WORK/STRUCTURE/pseudo``;
reused when present). Reported: its 3-D Dice against the left reference, and the Dice of the CAM
boxes filled (what the boxes alone say). Then, per seed, the U-Net is trained by
``training.volume_training.train_volume`` (what ``python -m training train-volume`` calls) with
``--method pseudo`` on the saved label (read back through ``pseudo_label_map``, as the CLI does)
and ``--method full`` on the reference (the control; rows of ``--reuse-full`` with the same
structure, seed and settings are reused instead), the same settings as bench/volume_training.py,
and evaluated on the right hemisphere (3-D Dice, NSD 2 mm, ``evaluate_volume``).

``--windows served,volume`` makes one label per classifier input window (``served``: the served
input; ``volume``: the volume's one window, ``training.cam_labels.classifier_volume``) and trains
on each. ``--oracle`` adds a diagnostic that uses the reference: LiteMedSAM inside the reference's
tight box on every ticked slice (what the refine step gives a perfect box); it trains nothing.

Writes ``--out`` (bench/cam_labels.json) and the ``cam_labels`` block of docs/TRAINING.md (under
its heading, appended at the end when absent; ``--table-only`` rewrites the block from ``--out``)::

    .venv/bin/python bench/cam_labels.py --structures brain,thalamus,putamen --seeds 0,1,2 \
        --windows served,volume --oracle --work runs/cam_labels
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
from training import cam_labels as cl  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training import volume_training as vt  # noqa: E402
from training.experiment import write_block  # noqa: E402
from training.train import TrainConfig  # noqa: E402
from training.volume_metrics import dice  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
CASE = SHARED / "volumes" / "colin27_t1"
SECTION = "cam_labels"
HEADING = "## Image-level labels: class activation maps -> box -> LiteMedSAM"
TARGET = 0.7          # the target: image labels >= 0.7 of full supervision (3-D Dice)
SETTINGS = ("iterations", "batch_size", "size", "threads")   # must match for a reused full row


def mask_file(structure: str, side: str) -> Path:
    """The reference NIfTI of ``structure`` for hemisphere ``side``: one file for a midline
    structure (``brain``, ``cerebellum``: cropped), ``NAME_side`` for a bilateral one."""
    single = CASE / "masks" / f"{structure}.nii.gz"
    return single if single.is_file() else CASE / "masks" / f"{structure}_{side}.nii.gz"


def crops(work: Path, structure: str) -> dict:
    import nibabel as nib

    nx = nib.load(str(CASE / "image.nii.gz")).shape[0]
    out = {}
    for side, xr in zip(("left", "right"), vt.hemisphere_ranges(nx)):
        image, mask = work / f"image_{side}.nii.gz", work / f"{structure}_{side}.nii.gz"
        if not image.is_file():
            vt.crop_nifti(CASE / "image.nii.gz", image, x=xr)
        if not mask.is_file():
            vt.crop_nifti(mask_file(structure, side), mask, x=xr)
        out[f"image_{side}"], out[f"mask_{side}"], out[f"x_{side}"] = image, mask, xr
    return out


def run_name(window: str) -> str:
    """The run (and label folder) of a classifier window: ``pseudo`` for the served input."""
    return "pseudo" if window == "served" else f"pseudo_{window}_window"


RUN_LABELS = {"full": "full reference masks", "pseudo": "CAM -> box -> LiteMedSAM pseudo-label",
              "pseudo_volume_window": "the same, classifier on the volume window"}


def make_label(args: argparse.Namespace, structure: str, volume, reference: np.ndarray, predictor_box: list,
               window: str = "served") -> tuple[Path, str]:
    """The saved CAM pseudo-label of the training crop (made once, then reused)."""
    folder, name = args.work / structure / run_name(window), f"{structure}_left"
    if not (folder / f"{name}.json").is_file():
        if not predictor_box:
            from service.inference.predictor import SamPredictor

            predictor_box.append(SamPredictor.from_repository(REPO / "model_repository", "medsam_lite",
                                                              threads=args.threads))
        cfg = cl.ClassifierConfig(size=args.size, iterations=args.classifier_iterations, seed=0,
                                  threads=args.threads, window=window)
        label = cl.cam_pseudo_label(predictor_box[0], volume, cl.ticks_from_mask(reference), name, cfg)
        cl.save(label, folder)
    return folder, name


def label_quality(folder: Path, name: str, volume, reference: np.ndarray) -> tuple[np.ndarray, dict]:
    """(the 1/0/-1 map as train-volume reads it, the label's quality and costs)."""
    labels, pl = vt.pseudo_label_map(folder, name, volume)
    meta = json.loads((folder / f"{name}.json").read_text())
    cam = meta["cam"]
    boxes = {k: b for k, b in zip(pl.key_slices, pl.boxes)}
    box_only = cl.box_masks(labels.shape, boxes)
    fg = labels == 1
    ticked = np.zeros(len(labels), bool)
    ticked[cam["ticks_present"]] = True
    area = float(np.prod(labels.shape[1:]))
    ref_box = [float(np.prod(b[0, 2:] - b[0, :2])) / area for b in (vt.slice_box(reference[k]) for k in
                                                                    np.flatnonzero(ticked))]
    cam_box = [(b[2] - b[0]) * (b[3] - b[1]) / area for b in boxes.values()]
    return labels, {
        "cam_box_area": float(np.mean(cam_box)) if cam_box else 0.0, "reference_box_area": float(np.mean(ref_box)),
        "ticked_slices": int(ticked.sum()), "slices": cam["slices"], "boxes": len(boxes),
        "classifier_seconds": cam["classifier"]["seconds"], "classifier_cpu_seconds": cam["classifier"]["cpu_seconds"],
        "classifier_iterations": cam["classifier"]["iterations"],
        "classifier_train_accuracy": cam["classifier"]["train_accuracy"],
        "cam_seconds": cam["cam_seconds"], "sam_seconds": cam["sam_seconds"],
        "sam_cpu_seconds": cam.get("sam_cpu_seconds"),
        "label_dice": dice(fg, reference), "box_only_dice": dice(box_only, reference),
        "uncertain_in_union": float((labels[fg | reference] < 0).mean()),
        "ignored_fraction": float((labels < 0).mean()), "threshold": cam["threshold"], "margin": cam["margin"]}


def oracle_box_dice(args: argparse.Namespace, structure: str, volume, reference: np.ndarray, predictor_box: list
                    ) -> float:
    """Diagnostic, not a training label: 3-D Dice of LiteMedSAM prompted, on every slice with
    reference voxels, with the reference's tight box (what the refine step gives a perfect box);
    cached in ``WORK/STRUCTURE/oracle_box.json``."""
    path = args.work / structure / "oracle_box.json"
    if path.is_file():
        return json.loads(path.read_text())["dice"]
    if not predictor_box:
        from service.inference.predictor import SamPredictor

        predictor_box.append(SamPredictor.from_repository(REPO / "model_repository", "medsam_lite",
                                                          threads=args.threads))
    boxes = {}
    for k in np.flatnonzero(cl.ticks_from_mask(reference)):
        x0, y0, x1, y1 = vt.slice_box(reference[k])[0]
        boxes[int(k)] = (int(x0), int(y0), int(x1), int(y1))
    t0 = time.perf_counter()
    masks, _ = cl.refine(predictor_box[0], volume, boxes)
    out = {"dice": dice(masks, reference), "slices": len(boxes), "seconds": time.perf_counter() - t0}
    path.write_text(json.dumps(out, indent=1))
    return out["dice"]


def reusable_full(path: Path | None, args: argparse.Namespace) -> dict[tuple[str, int], dict]:
    """(structure, seed) -> a ``full`` row of bench/volume_training.py's results with our settings."""
    if path is None or not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if any(saved.get("settings", {}).get(k) != getattr(args, k) for k in SETTINGS):
        return {}
    return {(r["structure"], r["seed"]): r for r in saved["rows"] if r["run"] == "full"}


def train_and_score(args, structure: str, method: str, seed: int, train_volume, labels, eval_volume, ref_eval,
                    source: dict, run: str | None = None) -> dict:
    run = run or method
    run_dir = args.work / structure / run / f"seed{seed}"
    cfg = TrainConfig(structure=structure, size=args.size, iterations=args.iterations, batch_size=args.batch_size,
                      seed=seed, threads=args.threads)
    result = vt.train_volume(cfg, train_volume, labels, method, run_dir, source=source, progress=False)
    record = json.loads((run_dir / vt.RUN_FILE).read_text())
    score = vt.evaluate_volume(result.model, eval_volume, ref_eval, args.size)
    return {"structure": structure, "run": run, "method": method, "seed": seed, "dice": score.dice, "nsd": score.nsd,
            "predicted_voxels": score.predicted_voxels, "reference_voxels": score.reference_voxels,
            "slices": len(record["slices"]), "fg_slices": len(record["foreground_slices"]),
            "ignored": record["ignored_fraction"], "seconds": result.seconds, "cpu_seconds": result.cpu_seconds,
            "iterations": result.iterations, "from": f"trained here ({run_dir.relative_to(REPO)})"
            if run_dir.is_relative_to(REPO) else f"trained here ({run_dir})"}


def _mean_sd(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def per_seed(rows: list[dict], key: str) -> str:
    return " / ".join(f"{r[key]:.3f}" for r in rows)


def table(rows: list[dict], labels: dict[str, dict], header: str) -> str:
    lines = [header, "",
             "| structure | method | seeds | train slices (with fg) | ignored | 3-D Dice mean ± sd (per seed) "
             "| NSD 2 mm mean ± sd (per seed) | fraction of full (Dice) | U-Net training s per run (wall / CPU) "
             "| full's rows |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for s in dict.fromkeys(r["structure"] for r in rows):
        full = [r for r in rows if r["structure"] == s and r["method"] == "full"]
        full_mean = _mean_sd([r["dice"] for r in full])[0] if full else None
        runs = ["full"] + [r for r in dict.fromkeys(r.get("run", r["method"]) for r in rows if r["structure"] == s)
                           if r != "full"]
        for run in runs:
            got = sorted((r for r in rows if r["structure"] == s and r.get("run", r["method"]) == run),
                         key=lambda r: r["seed"])
            if not got:
                continue
            method, label = got[0]["method"], RUN_LABELS.get(run, run)
            d, dsd = _mean_sd([r["dice"] for r in got])
            n, nsd_sd = _mean_sd([r["nsd"] for r in got])
            frac = d / full_mean if full_mean and full_mean >= 0.1 else None
            if method == "pseudo" and frac is not None:
                verdicts.append((s, run, d, full_mean, frac))
            lines.append(
                f"| {s} | {label} | {','.join(str(r['seed']) for r in got)} | {got[0]['slices']} "
                f"({got[0]['fg_slices']}) | {got[0]['ignored']:.3f} | {d:.3f} ± {dsd:.3f} "
                f"({per_seed(got, 'dice')}) | {n:.3f} ± {nsd_sd:.3f} "
                f"({per_seed(got, 'nsd')}) | {f'{frac:.2f}' if frac is not None else 'n/a'} | "
                f"{np.mean([r['seconds'] for r in got]):.0f} / {np.mean([r['cpu_seconds'] for r in got]):.0f} | "
                f"{'; '.join(sorted({r['from'].split(' (')[0].replace(str(REPO) + '/', '') for r in got}))} |")
    if labels:
        lines += ["", "| structure | label | ticked slices / slices | classifier: iterations, s wall / CPU, accuracy on "
                      "the ticks | CAM boxes | CAM-box-only 3-D Dice (left reference) | pseudo-label 3-D Dice "
                      "(left reference) | uncertain fraction of label ∪ reference | pseudo-labelling s: CAM / "
                      "LiteMedSAM (wall) | diagnostic: LiteMedSAM in the reference's tight box, 3-D Dice |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for key, q in labels.items():
            s, run = key.split("/")
            oracle = f"{q['oracle_box_sam_dice']:.3f}" if "oracle_box_sam_dice" in q else "not run"
            lines.append(f"| {s} | {RUN_LABELS.get(run, run)} | {q['ticked_slices']} / {q['slices']} | {q['classifier_iterations']}, "
                         f"{q['classifier_seconds']:.0f} / {q['classifier_cpu_seconds']:.0f}, "
                         f"{q['classifier_train_accuracy']:.3f} | {q['boxes']} | {q['box_only_dice']:.3f} | "
                         f"{q['label_dice']:.3f} | {q['uncertain_in_union']:.2f} | "
                         f"{q['cam_seconds']:.1f} / {q['sam_seconds']:.1f} | {oracle} |")
    lines += ["", "What the rows are: the only supervision of the pseudo-label rows is the slice ticks (a slice is "
              "ticked when the left reference has a voxel on it); the classifier, its CAM boxes and LiteMedSAM make "
              "the label (training/cam_labels.py), which trains the U-Net exactly as a one-box volume pseudo-label "
              "does (method `pseudo`, uncertain voxels ignored). The full control is the same U-Net on the left "
              "reference masks. Both are scored on the right hemisphere.", ""]
    for s, run, d, f_mean, frac in verdicts:
        q = labels.get(f"{s}/{run}", {})
        what = "" if run == "pseudo" else f" ({RUN_LABELS.get(run, run)})"
        text = (f"**{s}**{what}: the U-Net trained on the CAM pseudo-label reaches a mean 3-D Dice of {d:.3f} against "
                f"{f_mean:.3f} for full supervision, {frac:.2f} of full: the target of {TARGET} of full is "
                f"**{'met' if frac >= TARGET else 'not met'}**.")
        if q:
            text += (f" The CAM boxes cover on average {q['cam_box_area']:.0%} of a ticked slice, the reference's "
                     f"tight box {q['reference_box_area']:.0%}; the boxes filled score {q['box_only_dice']:.3f} "
                     f"against the left reference, LiteMedSAM inside them {q['label_dice']:.3f} "
                     f"({'better' if q['label_dice'] > q['box_only_dice'] else 'worse'} than the boxes alone)")
            if "oracle_box_sam_dice" in q:
                text += (f", and {q['oracle_box_sam_dice']:.3f} inside the reference's tight boxes (a diagnostic "
                         f"that uses the reference: what the refine step gives a perfect box)")
                if q["oracle_box_sam_dice"] - q["label_dice"] >= 0.2:
                    text += ": the CAM boxes, not the refine step, lose most of the label's quality"
                elif q["oracle_box_sam_dice"] < 0.5:
                    text += ": LiteMedSAM does poorly on this structure even inside the right box"
            text += "."
        lines.append(text)
        lines.append("")
    return "\n".join(lines).rstrip()


def write(args, argv, started: str, rows: list[dict], labels: dict, prose: str = "", machine: str | None = None
          ) -> str:
    import torch

    command = ".venv/bin/python bench/cam_labels.py " + " ".join(shlex.quote(a) for a in argv)
    threads = f"{args.threads} thread{'s' if args.threads != 1 else ''}"
    machine = machine or f"{platform.node()} ({cpu_name()})"
    header = (f"Measured on {machine} with {threads}, torch {torch.__version__} (a machine shared "
              f"with other jobs: wall seconds are inflated, CPU seconds less so), started {started}, by `{command}`. "
              f"U-Net: {args.iterations} iterations of batch {args.batch_size} at {args.size}x{args.size}, seeds "
              f"{args.seeds}. Train: left hemisphere of colin27_t1 (x < 90), slice ticks only; evaluate: right "
              f"hemisphere (x > 90). Classifier: {args.classifier_iterations} iterations, seed 0, input window(s) "
              f"{args.windows}; CAM threshold {cl.CAM_THRESHOLD} of the slice's maximum, box margin "
              f"{cl.BOX_MARGIN} of its side.")
    block = table(rows, labels, header) + (f"\n\n{prose}" if prose else "")
    out = {"command": command, "machine": machine, "started": started,
           "torch": torch.__version__, "settings": {k: getattr(args, k) for k in SETTINGS + ("seeds",
                                                                                            "classifier_iterations", "windows")},
           "cam_threshold": cl.CAM_THRESHOLD, "box_margin": cl.BOX_MARGIN, "target_fraction": TARGET,
           "labels": labels, "rows": rows}
    if not args.table_only:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    if not args.no_doc:
        text = args.doc.read_text() if args.doc.is_file() else ""
        if HEADING not in text:
            args.doc.write_text(text.rstrip() + "\n\n" + HEADING + "\n")
        write_block(args.doc, block, SECTION)
    return block


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--structures", default="brain")
    p.add_argument("--seeds", default="0")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--classifier-iterations", type=int, default=cl.ClassifierConfig.iterations)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "cam_labels")
    p.add_argument("--reuse-full", type=Path, default=REPO / "runs" / "volume_training_s3" / "results.json")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "cam_labels.json")
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "TRAINING.md")
    p.add_argument("--prose", type=Path, default=None, help="a text file appended to the doc block")
    p.add_argument("--windows", default="served",
                   help=f"comma list of the classifier's input windows ({', '.join(cl.WINDOWS)}): one label each")
    p.add_argument("--oracle", action="store_true",
                   help="diagnostic: also LiteMedSAM in the reference's tight box on every ticked slice")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--table-only", action="store_true", help="rewrite --out's doc block from --out (no runs)")
    args = p.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    import torch

    if args.table_only:
        saved = json.loads(args.out.read_text())
        for key, value in saved["settings"].items():
            setattr(args, key, value)
        prose = args.prose.read_text().strip() if args.prose else ""
        print(write(args, shlex.split(saved["command"])[2:], saved["started"], saved["rows"], saved["labels"],
                    prose, saved["machine"]))
        return 0

    torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    seeds = [int(s) for s in args.seeds.split(",")]
    reuse = reusable_full(args.reuse_full, args)
    prose = args.prose.read_text().strip() if args.prose else ""
    rows, labels, predictor_box = [], {}, []
    for s in args.structures.split(","):
        files = crops(args.work, s)
        train_volume, eval_volume = vt.read_volume(files["image_left"]), vt.read_volume(files["image_right"])
        ref_train = vt.model_masks(files["mask_left"], train_volume)
        ref_eval = vt.model_masks(files["mask_right"], eval_volume)
        oracle = oracle_box_dice(args, s, train_volume, ref_train, predictor_box) if args.oracle else None
        made = {}
        for window in args.windows.split(","):
            run = run_name(window)
            folder, name = make_label(args, s, train_volume, ref_train, predictor_box, window)
            made[run] = (folder, name) + label_quality(folder, name, train_volume, ref_train)
            labels[f"{s}/{run}"] = made[run][3]
            if oracle is not None:
                labels[f"{s}/{run}"]["oracle_box_sam_dice"] = oracle
            print(json.dumps({"structure": s, "run": run, **labels[f"{s}/{run}"]}), flush=True)
        for seed in seeds:
            for run in list(made) + ["full"]:
                if run == "full" and (s, seed) in reuse:
                    r = reuse[(s, seed)]
                    row = {k: r[k] for k in ("structure", "seed", "dice", "nsd", "predicted_voxels",
                                             "reference_voxels", "slices", "fg_slices", "ignored", "seconds",
                                             "cpu_seconds", "iterations")}
                    row.update(run="full", method="full", **{"from": f"reused from {args.reuse_full}"})
                elif run == "full":
                    row = train_and_score(args, s, "full", seed, train_volume, vt.label_map(ref_train), eval_volume,
                                          ref_eval, {"volume": str(files["image_left"]),
                                                     "labels": str(files["mask_left"])})
                else:
                    folder, name, pseudo, _ = made[run]
                    row = train_and_score(args, s, "pseudo", seed, train_volume, pseudo, eval_volume, ref_eval,
                                          {"volume": str(files["image_left"]), "labels": str(folder / f"{name}.json")},
                                          run)
                print(json.dumps(row), flush=True)
                rows.append(row)
                write(args, argv, started, rows, labels, prose)
    print(write(args, argv, started, rows, labels, prose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
