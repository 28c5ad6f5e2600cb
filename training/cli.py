"""``python -m training SUBCOMMAND``: weak labels -> pseudo-labels -> QC -> training -> evaluation -> export.

Examples (defaults read ``../shared/data``)::

    python -m training simulate --structure brain --out runs/brain/weak
    python -m training import --data DIR --coco boxes.json --scribbles scribble_pngs/ --out runs/x/weak
    python -m training pseudo-label --structure brain --weak runs/brain/weak --out runs/brain/pseudo
    python -m training qc --structure brain --weak runs/brain/weak --pseudo runs/brain/pseudo --out runs/brain/qc
    python -m training qc-benchmark --structure caudate
    python -m training train --structure brain --method box --weak runs/brain/weak --run-dir runs/brain/box
    python -m training evaluate --checkpoint runs/brain/box/checkpoint.pt
    python -m training export --checkpoint runs/brain/box/checkpoint.pt --name unet_brain
    python -m training experiment --structures brain,caudate --iterations 300
    python -m training volume-pseudo-labels --volume IMAGE.nii.gz --reference MASK.nii.gz --out runs/vol
    python -m training train-volume --method pseudo --volume IMAGE.nii.gz --pseudo runs/vol --run-dir runs/vol/pseudo
    python -m training evaluate-volume --checkpoint runs/vol/pseudo/checkpoint.pt --volume OTHER.nii.gz \\
        --reference OTHER_MASK.nii.gz
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path

from training import data, labelling, qc
from training import weak_labels as wl
from training.model import NetworkConfig
from training.train import METHODS, TrainConfig


def _cases(args: argparse.Namespace, split: str = "train") -> list[data.Case]:
    folder = args.data or data.SHARED_DATA / split
    cases = data.load_cases(folder, args.structure or "unknown")
    gap = args.min_dev_gap if split == "train" else None
    return data.select(cases, args.structure, gap, args.limit)


def _common(p: argparse.ArgumentParser, split: str = "train") -> None:
    p.add_argument("--data", type=Path, default=None, help=f"case folder (default ../shared/data/{split})")
    p.add_argument("--structure", default=None, help="keep only cases of this structure")
    p.add_argument("--min-dev-gap", type=int, default=3, help="drop train slices closer than this to a dev slice")
    p.add_argument("--limit", type=int, default=None, help="at most this many cases")


def _train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    p.add_argument("--iterations", type=int, default=d.iterations)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--size", type=int, default=d.size, help="model input side (multiple of 8)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--size-weight", type=float, default=d.size_weight)
    p.add_argument("--no-progress", action="store_true")


def _config(args: argparse.Namespace, **kw) -> TrainConfig:
    return TrainConfig(iterations=args.iterations, batch_size=args.batch_size, lr=args.lr, size=args.size,
                       seed=args.seed, threads=args.threads, size_weight=args.size_weight, **kw)


def cmd_simulate(args: argparse.Namespace) -> int:
    cases = _cases(args)
    labelling.simulate_all(cases, tuple(args.kinds.split(",")), args.seed, args.box_noise, args.out)
    (args.out / "simulation.json").write_text(json.dumps({"kinds": args.kinds, "seed": args.seed,
                                                          "box_noise": args.box_noise, "cases": len(cases)}))
    print(f"wrote weak labels of {len(cases)} cases to {args.out}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    cases = _cases(args)
    shapes = {c.case_id: c.mask.shape for c in cases}
    labels = wl.load_coco(args.coco, shapes) if args.coco else {}
    for case in cases:
        w = labels.get(case.case_id, wl.WeakLabels(case.case_id, case.mask.shape))
        png = args.scribbles / f"{case.case_id}.png" if args.scribbles else None
        if png is not None and png.is_file():
            w = replace(w, scribbles=wl.load_scribble_png(png))
        wl.save(w, args.out)
    print(f"wrote weak labels of {len(cases)} cases to {args.out}")
    return 0


def cmd_pseudo_label(args: argparse.Namespace) -> int:
    cases = _cases(args)
    weak = labelling.load_all(cases, args.weak)
    pseudo, results = labelling.pseudo_label_all(cases, weak, args.repository, args.out, threads=args.threads,
                                                 reuse=not args.force)
    print(f"pseudo-labels of {len(pseudo)} cases in {args.out}; "
          f"{sum(1 for r in results if r.flags)} flagged, report {args.out / 'qc' / 'qc.md'}")
    return 0


def cmd_qc(args: argparse.Namespace) -> int:
    from training import pseudo_labels as pl

    cases = _cases(args)
    weak = labelling.load_all(cases, args.weak)
    results, pictures = [], {}
    for case in cases:
        w = weak.get(case.case_id)
        if w is None:
            continue
        flags = []
        pseudo = pl.load(args.pseudo, case.case_id) if args.pseudo and (args.pseudo / f"{case.case_id}.npz").is_file() else None
        if pseudo is not None and w.boxes is not None:
            flags += qc.check_boxes(case.case_id, w.boxes, pseudo)
        if w.scribbles is not None:
            flags += qc.check_scribbles(case.case_id, case.image, w.scribbles)
        results.append(qc.CaseQC(case.case_id, flags))
        if flags:
            pictures[case.case_id] = qc.overlay(case.image, w.boxes, None if pseudo is None else pseudo.prob > 0.5,
                                                w.scribbles)
    report = qc.write_report(results, args.out, pictures)
    print(f"{sum(1 for r in results if r.flags)} of {len(results)} cases flagged; report {report}")
    return 0


def cmd_qc_benchmark(args: argparse.Namespace) -> int:
    from training.qc_benchmark import run

    rates = run(_cases(args), args.repository, args.seed)
    print(json.dumps(asdict(rates)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from training import pseudo_labels as pl
    from training.samples import prepare
    from training.train import common_size_bounds, train

    cases = _cases(args)
    weak = labelling.load_all(cases, args.weak) if args.weak else {}
    pseudo = {c.case_id: pl.load(args.pseudo, c.case_id) for c in cases
              if args.pseudo and (args.pseudo / f"{c.case_id}.npz").is_file()}
    samples = prepare(cases, args.size, weak, pseudo)
    lower, upper = common_size_bounds(samples)
    cfg = _config(args, method=args.method, structure=args.structure or "unknown", size_lower=lower, size_upper=upper)
    result = train(cfg, samples, args.run_dir, resume=not args.restart, progress=not args.no_progress)
    print(f"{result.iterations} iterations in {result.seconds:.0f} s; loss {result.history[0]:.4f} -> "
          f"{sum(result.history[-10:]) / len(result.history[-10:]):.4f}; checkpoint {args.run_dir / 'checkpoint.pt'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate, onnx_predictor, summarise, torch_predictor
    from training.train import load_model

    model, cfg = load_model(args.checkpoint)
    args.structure = args.structure or cfg.structure
    cases = _cases(args, "dev")
    predictor = onnx_predictor(str(args.onnx)) if args.onnx else torch_predictor(model)
    scores = evaluate(predictor, cases, cfg.size)
    for s in scores:
        print(f"{s.case_id}\tDice {s.dice:.3f}\tHD95 {s.hd95_mm:.1f} mm")
    for s in summarise(scores):
        print(json.dumps(asdict(s)))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from export.unet import export_checkpoint

    for path in export_checkpoint(args.checkpoint, args.repository, args.name, args.target, args.version):
        print(f"wrote {path}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from training.experiment import ExperimentConfig, run, write_doc

    base = _config(args)
    cfg = ExperimentConfig(structures=tuple(args.structures.split(",")), methods=tuple(args.methods.split(",")),
                           min_dev_gap=args.min_dev_gap, work=args.work, repository=args.repository, base=base)
    rows = run(cfg, progress=not args.no_progress)
    command = "python -m training " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    write_doc(args.doc, rows, command, args.doc_section)
    print(f"results in {args.work / 'results.json'} and {args.doc}")
    return 0


def cmd_seed_table(args: argparse.Namespace) -> int:
    from training.experiment import seed_table, write_block

    block = seed_table(args.work)
    write_block(args.doc, block, args.doc_section)
    print(block)
    return 0


def cmd_volume_pseudo_labels(args: argparse.Namespace) -> int:
    from service.core.domain import Window
    from service.core.volume import VolumeSource, load_volume
    from service.inference.predictor import SamPredictor
    from training import volume_pseudo_labels as vpl
    from training.volume_metrics import dice

    window = Window(*(float(v) for v in args.window.split(","))) if args.window else None
    volume = load_volume(VolumeSource("nifti", data=args.volume.read_bytes(), window=window))
    reference = load_volume(VolumeSource("nifti", data=args.reference.read_bytes()))
    name = args.name or args.reference.name.split(".")[0]
    bounds = tuple(int(v) for v in args.bounds.split(",")) if args.bounds else None
    predictor = SamPredictor.from_repository(args.repository, args.model, threads=args.threads)
    rules = vpl.UncertainRules(min_iou=args.min_iou, edge_px=args.edge_px)
    key_slices = vpl.EVERY_SLICE if args.key_slices == "every" else int(args.key_slices)
    pl = vpl.volume_pseudo_label(predictor, volume, reference, key_slices=key_slices, jitter=args.jitter,
                                 seed=args.seed, bounds=bounds, rules=rules, name=name)
    vpl.save(pl, args.out)
    flags, report = vpl.write_qc(pl, volume, args.out / "qc")
    ref = vpl.reference_slices(reference, volume)
    ref = volume.mask_array({k: ref[k] for k in range(len(ref)) if ref[k].any()}) > 0   # the label's grid
    certain = ~pl.uncertain
    print(f"{name}: key slices {list(pl.key_slices)}, 3-D Dice vs reference {dice(pl.label > 0, ref):.3f} "
          f"(certain voxels only {dice(pl.label[certain] > 0, ref[certain]):.3f}), "
          f"{pl.uncertain.mean():.4f} of voxels uncertain, {pl.seconds:.1f} s; {len(flags)} QC flags, "
          f"report {report}; files in {args.out}")
    return 0


def _window(args: argparse.Namespace) -> tuple[float, float] | None:
    return tuple(float(v) for v in args.window.split(",")) if args.window else None


def cmd_train_volume(args: argparse.Namespace) -> int:
    from training import volume_training as vt

    if args.context_slices < 0:
        raise SystemExit(f"--context-slices is the neighbouring slices on each side: 0 or more, not {args.context_slices}")
    volume = vt.read_volume(args.volume, _window(args))
    pseudo = args.method in vt.PSEUDO_METHODS
    if pseudo:
        if args.pseudo is None:
            raise SystemExit(f"--method {args.method} needs --pseudo DIR (written by volume-pseudo-labels)")
        name = args.pseudo_name or _only_label(args.pseudo)
        labels, pl = vt.pseudo_label_map(args.pseudo, name, volume)
        source = {"volume": str(args.volume), "pseudo": str(args.pseudo / f"{name}.json"),
                  "key_slices": list(pl.key_slices)}
    else:
        if args.reference is None:
            raise SystemExit(f"--method {args.method} needs --reference MASK.nii.gz")
        labels = vt.label_map(vt.model_masks(args.reference, volume))
        source = {"volume": str(args.volume), "reference": str(args.reference)}
    structure = args.structure or (name if pseudo else args.reference.name.split(".")[0])
    cfg = _config(args, structure=structure, network=NetworkConfig(context_slices=args.context_slices))
    result = vt.train_volume(cfg, volume, labels, args.method, args.run_dir, resume=not args.restart,
                             background_every=args.background_every, source=source, progress=not args.no_progress)
    record = json.loads((args.run_dir / vt.RUN_FILE).read_text())
    print(f"{args.method}: {len(record['slices'])} slices ({len(record['foreground_slices'])} with foreground, "
          f"{record['ignored_fraction']:.3f} of their voxels ignored); {result.iterations} iterations in "
          f"{result.seconds:.0f} s ({result.cpu_seconds:.0f} s CPU); loss {result.history[0]:.4f} -> "
          f"{sum(result.history[-10:]) / len(result.history[-10:]):.4f}; checkpoint {args.run_dir / 'checkpoint.pt'}")
    if args.export_name:
        for path in vt.export(args.run_dir, args.repository, args.export_name):
            print(f"wrote {path}")
    return 0


def _only_label(folder: Path) -> str:
    names = sorted(p.name[: -len("_label.nii.gz")] for p in folder.glob("*_label.nii.gz"))
    if len(names) != 1:
        raise SystemExit(f"{folder} holds {len(names)} pseudo-labels ({', '.join(names) or 'none'}): "
                         "say which with --pseudo-name")
    return names[0]


def cmd_evaluate_volume(args: argparse.Namespace) -> int:
    from training import volume_training as vt
    from training.train import load_model

    model, cfg = load_model(args.checkpoint)
    volume = vt.read_volume(args.volume, _window(args))
    score = vt.evaluate_volume(model, volume, vt.model_masks(args.reference, volume), cfg.size, args.tolerance_mm,
                               cfg.network.context_slices)
    print(json.dumps({"checkpoint": str(args.checkpoint), "volume": str(args.volume),
                      "reference": str(args.reference), **score.to_dict()}))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("-v", "--verbose", action="store_true")
    sub = top.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="simulate weak labels from full masks (seeded)")
    _common(p)
    p.add_argument("--kinds", default=",".join(wl.DEFAULT_KINDS), help=f"comma list of {wl.KINDS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--box-noise", type=float, default=0.1)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("import", help="weak labels from a COCO JSON (boxes, points) and scribble PNGs")
    _common(p)
    p.add_argument("--coco", type=Path, default=None)
    p.add_argument("--scribbles", type=Path, default=None, help="folder of CASE.png: 0 none, 1 bg, 2 fg")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("pseudo-label", help="LiteMedSAM inside each box (served ONNX models) + QC report")
    _common(p)
    p.add_argument("--weak", type=Path, required=True)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force", action="store_true", help="recompute cached pseudo-labels")
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_pseudo_label)

    p = sub.add_parser("qc", help="flag weak annotations that disagree with the image")
    _common(p)
    p.add_argument("--weak", type=Path, required=True)
    p.add_argument("--pseudo", type=Path, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.set_defaults(func=cmd_qc)

    p = sub.add_parser("qc-benchmark", help="QC flags on correct vs deliberately moved boxes and scribbles")
    _common(p)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_qc_benchmark)

    p = sub.add_parser("train", help="train the U-Net from one kind of supervision (resumes by default)")
    _common(p)
    _train_args(p)
    p.add_argument("--method", choices=METHODS, required=True)
    p.add_argument("--weak", type=Path, default=None)
    p.add_argument("--pseudo", type=Path, default=None)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice and HD95 on dev cases of the checkpoint's structure")
    _common(p, "dev")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--onnx", type=Path, default=None, help="evaluate this exported file instead of PyTorch")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="checkpoint -> ONNX + config.pbtxt in the model repository")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--name", required=True, help="served model name, e.g. unet_brain")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--version", type=int, default=1)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("experiment", help="full vs weak supervision table -> docs/TRAINING.md")
    _train_args(p)
    p.add_argument("--structures", default="brain,caudate")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--min-dev-gap", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("runs/experiment"))
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--doc", type=Path, default=Path("docs/TRAINING.md"))
    p.add_argument("--doc-section", default="results", help="marker name of the table's block in --doc")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("seed-table", help="Dice of several experiment runs (seeds) side by side -> --doc")
    p.add_argument("--work", type=Path, nargs="+", required=True, help="experiment work folders, one per seed")
    p.add_argument("--doc", type=Path, default=Path("docs/TRAINING.md"))
    p.add_argument("--doc-section", default="seeds")
    p.set_defaults(func=cmd_seed_table)

    p = sub.add_parser("volume-pseudo-labels",
                       help="one box (or N key slices) per structure, propagated -> 3-D label + uncertain mask + QC")
    p.add_argument("--volume", type=Path, required=True, help="image NIfTI")
    p.add_argument("--reference", type=Path, required=True,
                   help="reference mask NIfTI (the boxes are simulated from it)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--key-slices", choices=("1", "2", "3", "5", "every"), default="1",
                   help="boxes on this many key slices, propagated; every: a box on every slice of the structure, "
                        "LiteMedSAM inside each, nothing propagated (beyond the boxed slices: background)")
    p.add_argument("--jitter", type=float, default=None, help="noisy-box jitter, fraction of each box side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bounds", default=None, help="FIRST,LAST slice range to propagate over (default: all)")
    p.add_argument("--window", default=None, help="CENTER,WIDTH intensity window (CT); default per-slice percentiles")
    p.add_argument("--min-iou", type=float, default=0.5, help="slices with a predicted IoU below this are uncertain")
    p.add_argument("--edge-px", type=int, default=2, help="uncertain band around the mask edge, pixels")
    p.add_argument("--name", default=None, help="file stem (default: the reference's)")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="medsam_lite")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=cmd_volume_pseudo_labels)

    from training.volume_training import BACKGROUND_EVERY, METHODS as VOLUME_METHODS

    p = sub.add_parser("train-volume", help="the U-Net on the slices of one volume: reference masks, their "
                                            "per-slice boxes or scribbles, or a volume pseudo-label (uncertain ignored); "
                                            "resumes by default")
    _train_args(p)
    p.add_argument("--method", choices=tuple(VOLUME_METHODS), required=True,
                   help="; ".join(f"{k}: {v[1]}" for k, v in VOLUME_METHODS.items()))
    p.add_argument("--volume", type=Path, required=True, help="image NIfTI (the training volume)")
    p.add_argument("--reference", type=Path, default=None, help="reference mask NIfTI (full, boxes, scribbles, full_ce)")
    p.add_argument("--pseudo", type=Path, default=None,
                   help="folder written by volume-pseudo-labels (pseudo, pseudo_ce)")
    p.add_argument("--pseudo-name", default=None, help="its file stem (default: the only one in --pseudo)")
    p.add_argument("--structure", default=None, help="structure name in the checkpoint and the served model")
    p.add_argument("--background-every", type=int, default=BACKGROUND_EVERY,
                   help="keep slice k without foreground when k %% this == 0")
    p.add_argument("--window", default=None, help="CENTER,WIDTH intensity window (CT); default per-slice percentiles")
    p.add_argument("--context-slices", type=int, default=0,
                   help="2.5-D: give the network this many neighbouring slices on each side as channels "
                        "(0: one slice); the exported model is then served for volumes only")
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--export-name", default=None, help="also export the model under this name into --repository")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.set_defaults(func=cmd_train_volume)

    p = sub.add_parser("evaluate-volume", help="3-D Dice and NSD of a checkpoint on a volume against its reference")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--volume", type=Path, required=True)
    p.add_argument("--reference", type=Path, required=True)
    p.add_argument("--window", default=None, help="CENTER,WIDTH intensity window (CT)")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance")
    p.set_defaults(func=cmd_evaluate_volume)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args))
