"""The comparison of supervision kinds: same network, same iterations, same seed.

For each structure: train cases of that structure with ``dev_slice_gap >= min_dev_gap``,
simulated weak labels (seeded), LiteMedSAM pseudo-labels with QC, one training run per
method (resumed where a run folder already holds its checkpoint), evaluation on the dev
cases of that structure. Results go to ``WORK/results.json`` and into docs/TRAINING.md
between the ``<!-- SECTION:begin -->`` / ``<!-- SECTION:end -->`` markers (``--doc-section``).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from training import data, labelling
from training.evaluate import evaluate, summarise, torch_predictor
from training.samples import prepare
from training.train import METHODS, TrainConfig, common_size_bounds, train

log = logging.getLogger(__name__)

LABELS = {"full": "full masks", "box": "boxes (tightness prior)",
          "box_size": "boxes (tightness prior + box fill ≥ 0.4)", "box_pseudo": "boxes + LiteMedSAM pseudo-labels",
          "scribble": "scribbles (partial CE)", "points": "points (partial CE + size constraint)"}


@dataclass(frozen=True)
class ExperimentConfig:
    structures: tuple[str, ...] = ("brain", "caudate")
    methods: tuple[str, ...] = METHODS
    train_dir: Path = data.SHARED_DATA / "train"
    dev_dir: Path = data.SHARED_DATA / "dev"
    min_dev_gap: int = 3
    work: Path = Path("runs/experiment")
    repository: Path = Path("model_repository")
    base: TrainConfig = TrainConfig()


def run(cfg: ExperimentConfig, progress: bool = True) -> list[dict]:
    """Run (or resume) every structure x method; returns one row per run."""
    rows = _previous(cfg.work / "results.json")
    all_train = data.load_npz_folder(cfg.train_dir)
    all_dev = data.load_npz_folder(cfg.dev_dir)
    for structure in cfg.structures:
        train_cases = data.select(all_train, structure, cfg.min_dev_gap)
        dev_cases = data.select(all_dev, structure)
        if not train_cases or not dev_cases:
            raise ValueError(f"{structure}: {len(train_cases)} train and {len(dev_cases)} dev cases")
        root = cfg.work / structure
        weak = labelling.simulate_all(train_cases, ("boxes", "scribbles", "points", "presence"), cfg.base.seed,
                                      folder=root / "weak")
        pseudo, qc_results, pseudo_seconds = {}, [], None
        if "box_pseudo" in cfg.methods:
            t0 = time.perf_counter()
            pseudo, qc_results = labelling.pseudo_label_all(train_cases, weak, cfg.repository, root / "pseudo",
                                                            threads=cfg.base.threads)
            pseudo_seconds = round(time.perf_counter() - t0, 1)  # ~0 when cached from an earlier run
        samples = prepare(train_cases, cfg.base.size, weak, pseudo)
        lower, upper = common_size_bounds(samples)
        for method in cfg.methods:
            tcfg = replace(cfg.base, method=method, structure=structure, size_lower=lower, size_upper=upper)
            result = train(tcfg, samples, root / method, resume=True, progress=progress)
            summary = summarise(evaluate(torch_predictor(result.model), dev_cases, tcfg.size))[0]
            head = sum(result.history[:20]) / max(1, len(result.history[:20]))
            tail = sum(result.history[-20:]) / max(1, len(result.history[-20:]))
            row = {"structure": structure, "method": method, "train_cases": len(train_cases),
                   "dev_cases": len(dev_cases), "iterations": result.iterations,
                   "seconds": round(result.seconds, 1), "cpu_seconds": round(result.cpu_seconds, 1),
                   "loss_first20": head, "loss_last20": tail,
                   **{k: v for k, v in asdict(summary).items() if k != "structure"},
                   "pseudo_label_dice_train": labelling.pseudo_dice(train_cases, pseudo) if pseudo else None,
                   "qc_flagged_cases": sum(1 for r in qc_results if r.flags) if qc_results else None,
                   "pseudo_label_seconds": pseudo_seconds,
                   "size_bounds": [lower, upper]}
            rows = _merge(rows, row)
            log.info("%s/%s: %s", structure, method, row)
            cfg.work.mkdir(parents=True, exist_ok=True)
            (cfg.work / "results.json").write_text(json.dumps(rows, indent=1))
    return rows


def _previous(path: Path) -> list[dict]:
    """Rows of an earlier run in the same work folder (kept unless re-run)."""
    return json.loads(path.read_text()) if path.is_file() else []


def _merge(rows: list[dict], row: dict) -> list[dict]:
    """``rows`` with ``row`` replacing the one of the same structure and method, sorted by
    structure (order of first appearance), then by method (order of :data:`METHODS`)."""
    kept = [r for r in rows if (r["structure"], r["method"]) != (row["structure"], row["method"])] + [row]
    order = list(dict.fromkeys(r["structure"] for r in kept))
    kept.sort(key=lambda r: (order.index(r["structure"]),
                             METHODS.index(r["method"]) if r["method"] in METHODS else len(METHODS)))
    return kept


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: list[dict], command: str) -> str:
    """Markdown: results per structure with the fraction of the fully supervised Dice."""
    full = {r["structure"]: r["dice_mean"] for r in rows if r["method"] == "full"}
    out = [f"Last written by `{command}` (rows of earlier runs in the same --work folder are kept) "
           f"on {platform.node() or 'this machine'} "
           f"({torch.get_num_threads()} threads, torch {torch.__version__}).", "",
           "| structure | supervision | train / dev cases | Dice (mean ± sd) | HD95 mm | empty preds "
           "| fraction of full Dice | training time s (wall / CPU) | iterations |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        frac = r["dice_mean"] / full[r["structure"]] if full.get(r["structure"]) else math.nan
        out.append(f"| {r['structure']} | {LABELS.get(r['method'], r['method'])} | {r['train_cases']} / "
                   f"{r['dev_cases']} | {_fmt(r['dice_mean'])} ± {_fmt(r['dice_std'], 2)} | "
                   f"{_fmt(r['hd95_mean_mm'], 1)} | {r['empty']} | {_fmt(frac, 2)} | "
                   f"{r['seconds']:.0f} / {r.get('cpu_seconds', math.nan):.0f} | "
                   f"{r['iterations']} |")
    extra = [r for r in rows if r["method"] == "box_pseudo"]
    if extra:
        out += ["", "| structure | LiteMedSAM pseudo-label Dice on train (certain fg vs reference) "
                "| cases flagged by QC | pseudo-labelling time s | size bounds for points (model px) |",
                "|---|---|---|---|---|"]
        for r in extra:
            out.append(f"| {r['structure']} | {_fmt(r['pseudo_label_dice_train'])} | {r['qc_flagged_cases']} of "
                       f"{r['train_cases']} | {r.get('pseudo_label_seconds')} | "
                       f"{[round(b) for b in r['size_bounds']]} |")
    return "\n".join(out)


def write_doc(doc: Path, rows: list[dict], command: str, section: str = "results") -> None:
    """Replace the text between ``<!-- SECTION:begin -->`` and ``<!-- SECTION:end -->`` in
    ``doc`` with the results table (appended if absent)."""
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_block(doc, table(rows, command), section)


def seed_table(work_dirs: list[Path]) -> str:
    """Markdown: each method's dev Dice per run folder (one per seed), mean ± sd over them and
    the fraction of the mean fully supervised Dice."""
    runs = [{(r["structure"], r["method"]): r for r in _previous(Path(d) / "results.json")} for d in work_dirs]
    structures = list(dict.fromkeys(k[0] for run_rows in runs for k in run_rows))
    out = [f"Runs: {', '.join(f'`{d}`' for d in work_dirs)}.", "",
           "| structure | supervision | Dice per run | mean ± sd over runs | fraction of full (means) |",
           "|---|---|---|---|---|"]
    for structure in structures:
        full = [run_rows[(structure, "full")]["dice_mean"] for run_rows in runs if (structure, "full") in run_rows]
        for method in METHODS:
            dice = [run_rows[(structure, method)]["dice_mean"] for run_rows in runs if (structure, method) in run_rows]
            if not dice:
                continue
            frac = float(np.mean(dice) / np.mean(full)) if full else math.nan
            out.append(f"| {structure} | {LABELS.get(method, method)} | {' / '.join(f'{d:.3f}' for d in dice)} | "
                       f"{np.mean(dice):.3f} ± {np.std(dice):.3f} | {_fmt(frac, 2)} |")
    return "\n".join(out)


def write_block(doc: Path, block: str, section: str) -> None:
    """Put ``block`` between the ``section`` markers of ``doc`` (appended if absent)."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = doc.read_text() if doc.is_file() else "# Training\n"
    block = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)
