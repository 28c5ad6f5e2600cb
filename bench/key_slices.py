"""Choosing which slices to annotate (training/key_slices.py) measured on colin27_t1: for each
structure and budget of k boxes, the 3-D Dice and NSD (2 mm) against the reference of the volume
pseudo-label made from the key slices each strategy picks: ``even`` (today's rule), ``random``
(over ``--seeds``, mean ± sd) and ``uncertainty`` (sequential, from the predictor's output).

One :class:`VolumePredictor` for the whole volume: every slice goes through the encoder at most
once, and all structures, strategies and budgets reuse the cached slice embeddings (only the
decoder runs again). Prints one JSON row per label, writes them to ``bench/key_slices.json`` and
the tables between the ``key_slices`` markers at the end of docs/TRAINING.md (under "## Choosing
which slices to annotate"; text after a ``<!-- key_slices:prose -->`` line in the old block is
kept)::

    OMP_NUM_THREADS=1 .venv/bin/python bench/key_slices.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.measure import cpu_name  # noqa: E402
from service.core.volume import VolumeSource, load_volume  # noqa: E402
from service.inference.predictor import SamPredictor  # noqa: E402
from service.inference.volume_predictor import VolumePredictor  # noqa: E402
from training import key_slices as ks  # noqa: E402
from training import volume_pseudo_labels as vpl  # noqa: E402
from training.experiment import write_block  # noqa: E402
from training.volume_metrics import dice, nsd  # noqa: E402

SHARED = Path(os.environ.get("MEDSEG_SHARED_DATA") or REPO.parent / "shared" / "data")
CASE = SHARED / "volumes" / "colin27_t1"
STRUCTURES = ("thalamus_left", "putamen_left", "caudate_left", "hippocampus_left", "amygdala_left")
SECTION = "key_slices"
HEADING = "## Choosing which slices to annotate"
PROSE = f"<!-- {SECTION}:prose -->"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--structures", default=",".join(STRUCTURES), help="comma-separated colin27_t1 mask names")
    p.add_argument("--budgets", default="1,2,3,5", help="boxes per structure, comma-separated")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the random strategy")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    p.add_argument("--no-nsd", action="store_true", help="skip the surface Dice")
    p.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    p.add_argument("--doc", type=Path, default=REPO / "docs" / "TRAINING.md")
    p.add_argument("--no-doc", action="store_true")
    p.add_argument("--table-only", action="store_true", help="no run: the doc block of the rows in --out")
    return p.parse_args(argv)


def runs(seeds: list[int]) -> list[tuple[str, int | None]]:
    """(strategy, seed) of every run of one structure; seed None where the strategy has none."""
    return [("even", None)] + [("random", s) for s in seeds] + [("uncertainty", None)]


def measure(vp: VolumePredictor, vol, name: str, ref: np.ndarray, refg: np.ndarray, spacing: list[float],
            budgets: list[int], seeds: list[int], with_nsd: bool) -> list[dict]:
    """Rows of one structure: every strategy (random: every seed) at every budget."""
    rows = []
    areas = ref.reshape(len(ref), -1).sum(axis=1)
    for strategy, seed in runs(seeds):
        start, decodes = time.perf_counter(), vp.decodes
        nested = None if strategy == "even" else ks.choose(strategy, vp, ref, max(budgets), seed=seed or 0, name=name)
        choose_s = time.perf_counter() - start
        for k in budgets:
            t = time.perf_counter()
            picks = ks.even_slices(areas, k) if nested is None else nested[:k]
            pl = vpl.volume_pseudo_label(vp, vol, ref, keys=picks, name=name)
            label = pl.label > 0
            covered = vpl.extent(pl.masks)
            row = dict(structure=name, strategy=strategy, seed=seed, budget=k, picked=list(picks),
                       boxed=list(pl.key_slices), empty_picks=[j for j in picks if j not in pl.key_slices],
                       dice=dice(label, refg), nsd=nsd(label, refg, spacing) if with_nsd else None,
                       covered=list(covered) if covered else None, reference=list(vpl.extent(ref)),
                       stops=[f"{'below' if s.step < 0 else 'above'} {s.last}: {s.reason}" for s in pl.stops],
                       seconds=time.perf_counter() - t + (choose_s if k == budgets[0] else 0.0))
            print(json.dumps(row), flush=True)
            rows.append(row)
        print(json.dumps({"structure": name, "strategy": strategy, "seed": seed,
                          "decodes": vp.decodes - decodes, "encoded_slices": len(vp.encoder_s)}), flush=True)
    return rows


# --------------------------------------------------------------------------- the doc block
def _mean_sd(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def _picks(row: dict) -> str:
    return ", ".join(f"{j}" if j in row["boxed"] else f"{j}∅" for j in row["picked"])


def _cell(rows: list[dict], metric: str) -> str:
    values = [r[metric] for r in rows if r[metric] is not None]
    if not values:
        return "n/a"
    return f"{values[0]:.3f}" if len(values) == 1 else _mean_sd(values)


def curve_table(rows: list[dict], budgets: list[int], seeds: list[int]) -> list[str]:
    """Means over the structures per budget; random: mean ± sd over seeds of the per-seed means."""
    out = ["| boxes k | even Dice | random Dice | uncertainty Dice | even NSD | random NSD | uncertainty NSD |",
           "|---|---|---|---|---|---|---|"]

    def mean_of(strategy: str, k: int, metric: str, seed=None) -> float | None:
        got = [r[metric] for r in rows if r["strategy"] == strategy and r["budget"] == k and r["seed"] == seed]
        return float(np.mean(got)) if got and None not in got else None

    for k in budgets:
        cells = []
        for metric in ("dice", "nsd"):
            rnd = [mean_of("random", k, metric, s) for s in seeds]
            rnd_cell = "n/a" if None in rnd else _mean_sd(rnd)
            ev, un = mean_of("even", k, metric), mean_of("uncertainty", k, metric)
            cells += ["n/a" if ev is None else f"{ev:.3f}", rnd_cell, "n/a" if un is None else f"{un:.3f}"]
        out.append(f"| {k} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} | {cells[5]} |")
    return out


def structure_table(rows: list[dict], budgets: list[int], structures: list[str]) -> list[str]:
    out = ["| structure (reference slices) | k | even: slices | even Dice / NSD | random Dice | random NSD "
           "| uncertainty: slices | uncertainty Dice / NSD |", "|---|---|---|---|---|---|---|---|"]
    for s in structures:
        for k in budgets:
            pick = [r for r in rows if r["structure"] == s and r["budget"] == k]
            if not pick:
                continue
            ev = next(r for r in pick if r["strategy"] == "even")
            un = next(r for r in pick if r["strategy"] == "uncertainty")
            rnd = [r for r in pick if r["strategy"] == "random"]
            ref = ev["reference"]
            out.append(f"| {s} ({ref[0]}–{ref[1]}) | {k} | {_picks(ev)} | {ev['dice']:.3f} / {_cell([ev], 'nsd')} | "
                       f"{_cell(rnd, 'dice')} | {_cell(rnd, 'nsd')} | {_picks(un)} | {un['dice']:.3f} / "
                       f"{_cell([un], 'nsd')} |")
    return out


def comparison(rows: list[dict], budgets: list[int], structures: list[str]) -> list[str]:
    """Per budget: on how many structures uncertainty's Dice is above / equal to / below even's
    and the random mean's (equal: within 0.0005)."""
    out = []
    for k in budgets:
        counts = {"even": [0, 0, 0], "the random mean": [0, 0, 0]}
        for s in structures:
            mine = [r for r in rows if r["structure"] == s and r["budget"] == k]
            un = [r["dice"] for r in mine if r["strategy"] == "uncertainty"]
            ev = [r["dice"] for r in mine if r["strategy"] == "even"]
            rnd = [r["dice"] for r in mine if r["strategy"] == "random"]
            if not (un and ev and rnd):
                continue
            for other, value in (("even", ev[0]), ("the random mean", float(np.mean(rnd)))):
                d = un[0] - value
                counts[other][0 if d > 5e-4 else 1 if d >= -5e-4 else 2] += 1
        out.append(f"k = {k}: uncertainty's Dice vs " + "; vs ".join(
            f"{other}: above on {a}, equal on {e}, below on {b}" for other, (a, e, b) in counts.items())
            + f" (of {len(structures)} structures).")
    return out


def block(rows: list[dict], header: str, budgets: list[int], structures: list[str], seeds: list[int],
          prose: str) -> str:
    lines = [header, "",
             "Mean over the structures (random: mean ± sd over the seeds of the per-seed means):", "",
             *curve_table(rows, budgets, seeds), "",
             "Per structure. Slices are in pick order; ∅ marks a picked slice without reference pixels (no box drawn,",
             "the pick still spent). Random: mean ± sd over the seeds.", "",
             *structure_table(rows, budgets, structures), "",
             *[f"* {line}" for line in comparison(rows, budgets, structures)], "", PROSE]
    return "\n".join(lines) + ("\n" + prose.strip("\n") if prose.strip() else "")


def old_prose(doc: Path) -> str:
    """Hand-written text after the prose marker in the doc's current block (kept on rewrite)."""
    text = doc.read_text() if doc.is_file() else ""
    end = f"<!-- {SECTION}:end -->"
    if PROSE not in text or end not in text:
        return ""
    return text[text.index(PROSE) + len(PROSE): text.index(end)]


def write_doc(doc: Path, content: str) -> None:
    """The block under :data:`HEADING` at the end of ``doc`` (heading added when the block is new)."""
    text = doc.read_text() if doc.is_file() else "# Training\n"
    if f"<!-- {SECTION}:begin -->" not in text:
        doc.write_text(text.rstrip() + f"\n\n{HEADING}\n")
    write_block(doc, content, SECTION)


def header(meta: dict) -> str:
    """The block's first line, from the run's record (``bench/key_slices.json`` less its rows)."""
    seeds = sorted({r["seed"] for r in meta["rows"] if r["seed"] is not None})
    n = meta["threads"]
    return (f"Measured by `{meta['command']}` on {meta['host']} ({meta['cpu']}, {n} ONNX Runtime "
            f"thread{'s' if n != 1 else ''}), started {meta['started']}: colin27_t1, `medsam_lite`, tight "
            f"boxes, default propagation rules over all{' ' + str(meta['depth']) if 'depth' in meta else ''} slices; random seeds "
            f"{', '.join(map(str, seeds))}. Encoder: {meta['encoded_slices']} slices once ({meta['encoder_s']:.0f} s), "
            f"shared by every structure, strategy and budget; decoder: {meta['decodes']} calls "
            f"({meta['decoder_s']:.0f} s); wall {meta['wall_s'] / 60:.1f} min. Rows: `bench/key_slices.json`.")


def render(meta: dict, doc: Path | None) -> str:
    """The doc block of a run's record (``doc``'s hand-written prose kept); written to ``doc``."""
    rows = meta["rows"]
    structures = list(dict.fromkeys(r["structure"] for r in rows))
    budgets = sorted({r["budget"] for r in rows})
    seeds = sorted({r["seed"] for r in rows if r["seed"] is not None})
    content = block(rows, header(meta), budgets, structures, seeds, old_prose(doc) if doc else "")
    if doc is not None:
        write_doc(doc, content)
    return content


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.table_only:
        print(render(json.loads(args.out.read_text()), None if args.no_doc else args.doc))
        return 0
    structures = [s.strip() for s in args.structures.split(",") if s.strip()]
    budgets = sorted(int(b) for b in args.budgets.split(","))
    seeds = [int(s) for s in args.seeds.split(",")]
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        import torch

        torch.set_num_threads(args.threads)   # the NSD's distance transforms (MONAI)
    except ImportError:
        pass
    t0 = time.perf_counter()
    vol = load_volume(VolumeSource("nifti", data=(CASE / "image.nii.gz").read_bytes()))
    pred = SamPredictor.from_repository(REPO / "model_repository", "medsam_lite", threads=args.threads)
    vp = VolumePredictor(pred, vol)      # one for the volume: each slice's embedding is computed once
    spacing = [float(v) for v in np.linalg.norm(np.asarray(vol.affine)[:3, :3], axis=0)]
    rows: list[dict] = []
    for s in structures:
        refv = load_volume(VolumeSource("nifti", data=(CASE / "masks" / f"{s}.nii.gz").read_bytes()))
        ref = vpl.reference_slices(refv, vol)
        refg = vol.mask_array({k: ref[k] for k in range(len(ref)) if ref[k].any()}) > 0
        rows += measure(vp, vol, s, ref, refg, spacing, budgets, seeds, not args.no_nsd)
    meta = {"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/key_slices.py" + "".join(
                f" {shlex.quote(a)}" for a in (argv if argv is not None else sys.argv[1:])),
            "started": started, "host": platform.node(), "cpu": cpu_name(), "threads": args.threads,
            "depth": vol.depth, "wall_s": time.perf_counter() - t0, "encoded_slices": len(vp.encoder_s),
            "encoder_s": sum(vp.encoder_s.values()), "decodes": vp.decodes, "decoder_s": vp.decode_s}
    print(json.dumps(meta), flush=True)
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(render({**meta, "rows": rows}, None if args.no_doc else args.doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
