"""3-D volumes, side by side on this machine, in one run:

1. **Speed of one 3-D case.** A real gateway process (``python -m service --default-model auto``,
   the product default; the model it chose is read back from ListModels' ``is_default``) serving
   a structure of ``../shared/data/volumes/colin27_t1`` uploaded as NIfTI: one box = the
   reference box (``masks/NAME.nii.gz``, input-convention slices ``np.flipud(vol[:, :, k].T)``,
   the slice of largest area) through ``SegmentVolume`` streaming. Against the PyTorch
   LiteMedSAM (``export/reference.py``'s ``TorchReference``: its network's image encoder and the
   prompt decoder ``export.medsam_lite.DecoderForExport``, the served decoder's exact tensors)
   doing the same propagation slice by slice: :func:`service.inference.propagation.run_state`
   driven by :func:`propagation.drive` through a :class:`VolumePredictor` whose
   ``SamPredictor`` runs its model calls on the torch modules (same preprocessing, geometry,
   prompts, upsampling and mask feature as the gateway). Runs are interleaved (gateway,
   reference, gateway, ...), each on a fresh upload (no embedding reused), medians reported.
2. **First-slice latency**: the time from the call to the first streamed slice must be within
   encoder + decoder + 100 ms (the gateway's own stage means, ``medseg_stage_duration_seconds``,
   over the same call).
3. **Gateway overhead per slice**: (stream wall time - encoder and mask_decoder stage sums of the
   same call) / streamed slices, as a % of the model time per slice (target <= 10 %).
4. **Memory**: a 512x512x300 int16 volume tiled from the real CT (``promed_ct_0051``: 2x2 in
   plane, slices repeated) uploaded raw (and as .nii.gz) to a gateway started with a short
   ``--volume-ttl-s``: peak RSS during the upload minus the RSS before it (VmHWM after
   ``clear_refs``) as a multiple of the volume's bytes (target <= 2.5x); the RSS once the volume
   expired (waited past the TTL, then a call naming its id answered NOT_FOUND, which sweeps) and
   ``medseg_volumes_stored_bytes`` back at 0.

Prints the table and writes ``bench/volume_bench_results.json`` and the ``## 3-D volumes``
section of ``docs/BENCHMARKS.md`` (between ``<!-- volumes:begin -->`` and ``<!-- volumes:end -->``;
the rest of the file is left as it is)::

    .venv/bin/python bench/volume_bench.py [--quick] [--structure thalamus_left]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from bench import measure  # noqa: E402
from bench.harness import GatewayProcess, ensure_models, metric_value, proc_status, reset_peak  # noqa: E402

VOLUMES = REPO.parent / "shared" / "data" / "volumes"
SUBJECT = "colin27_t1"
DEFAULT_STRUCTURE, QUICK_STRUCTURE = "thalamus_left", "pallidum_left"
CT = "promed_ct_0051"
MEMORY_SHAPE, QUICK_MEMORY_SHAPE = (300, 512, 512), (60, 512, 512)   # (Z, H, W) int16
SECTION = "volumes"  # docs/BENCHMARKS.md markers (bench.docs)
FIRST_SLICE_SLACK_S = 0.100
OVERHEAD_TARGET = 0.10
MEMORY_TARGET = 2.5
MiB = 1024 * 1024


# --------------------------------------------------------------------------- the case
def input_slices(nifti_array: np.ndarray) -> np.ndarray:
    """(Z, H, W): slice k in the NIfTI input convention ``np.flipud(vol[:, :, k].T)``."""
    return np.stack([np.flipud(nifti_array[:, :, k].T) for k in range(nifti_array.shape[2])])


def reference_case(mask_path: Path) -> dict:
    """The reference mask's slice of largest area and its tight box (input-convention pixels)."""
    import nibabel

    from service.inference import propagation as prop

    truth = input_slices(np.asanyarray(nibabel.load(str(mask_path)).dataobj) > 0)
    areas = truth.reshape(len(truth), -1).sum(axis=1)
    k = int(np.argmax(areas))
    box = prop.bounding_box(truth[k])
    spans = np.flatnonzero(areas)
    return {"slice": k, "box": [box.x0, box.y0, box.x1, box.y1], "truth": truth,
            "truth_slices": [int(spans[0]), int(spans[-1])], "truth_voxels": int(areas.sum())}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


# --------------------------------------------------------------------------- the gateway
def gateway_run(gw: GatewayProcess, client, image: Path, case: dict, depth_hw: tuple[int, int, int],
                warm: bool = False) -> dict:
    """Upload ``image`` (not timed), one box through SegmentVolume (timed: call -> first slice,
    call -> summary), the model stage sums of exactly this call from /metrics, delete."""
    info = client.upload_volume(image)
    try:
        k, box = case["slice"], case["box"]
        before = gw.metrics_text()
        start = time.perf_counter()
        stream = client.segment_volume(info.volume_id, slice_index=k, box=box,
                                       range=(k, k) if warm else None)
        first = None
        at_first = ""
        masks = np.zeros(depth_hw, dtype=bool)
        streamed = []
        for s in stream:
            if first is None:
                first = time.perf_counter() - start
                at_first = gw.metrics_text()   # the stage sums of the first slice alone (its next encoder runs)
            streamed.append(s.slice_index)
            masks[s.slice_index] = s.mask
        summary = stream.summary
        wall = time.perf_counter() - start
        after = gw.metrics_text()
    finally:
        client.delete_volume(info.volume_id)
    then = measure.stage_totals(before)

    def delta(stage: str, text: str) -> tuple[float, int]:
        t1, c1 = measure.stage_totals(text).get(stage, [0.0, 0.0])
        t0, c0 = then.get(stage, [0.0, 0.0])
        return t1 - t0, int(round(c1 - c0))

    (enc_s, enc_n), (dec_s, dec_n) = delta("encoder", after), delta("mask_decoder", after)
    (enc1_s, enc1_n), (dec1_s, dec1_n) = delta("encoder", at_first), delta("mask_decoder", at_first)
    enc_mean, dec_mean = (enc_s / enc_n if enc_n else None), (dec_s / dec_n if dec_n else None)
    bound = (enc_mean or 0.0) + (dec_mean or 0.0) + FIRST_SLICE_SLACK_S
    return {"wall_s": wall, "first_slice_s": first, "first_slice_bound_s": bound,
            "first_slice_within": first is not None and first <= bound,
            "first_slice_encoder_s": enc1_s if enc1_n == 1 else None,
            "first_slice_decoder_s": dec1_s if dec1_n == 1 else None, "slices": len(streamed),
            "slice_range": [min(streamed), max(streamed)] if streamed else None,
            "encoder_sum_s": enc_s, "encoder_calls": enc_n, "decoder_sum_s": dec_s, "decoder_calls": dec_n,
            "encoder_mean_s": enc_mean, "decoder_mean_s": dec_mean, "model": summary.model_name, "timings_ms": dict(summary.timings_ms),
            "embeddings_reused": summary.embeddings_reused, "stop_reasons": list(summary.stop_reasons),
            "voxels": summary.voxel_count, "masks": masks}


# --------------------------------------------------------------------------- the PyTorch reference
class TorchVolumeReference:
    """The gateway's predictor code (:class:`SamPredictor` via :class:`VolumePredictor`) with
    every model call answered by PyTorch LiteMedSAM (export/reference.py's network)."""

    def __init__(self, threads: int = 2) -> None:
        import torch

        from export.medsam_lite import DecoderForExport, EncoderForExport
        from export.reference import TorchReference
        from service.backends.repository import SamModel, discover
        from service.inference.predictor import SamPredictor, sessions_run

        self.torch = torch
        ref = TorchReference(REPO / ".cache", threads=threads)
        self.encoder, self.decoder = EncoderForExport(ref.net).eval(), DecoderForExport(ref.net).eval()
        model = discover(REPO / "model_repository", "medsam_lite")["medsam_lite"]
        assert isinstance(model, SamModel)
        enc_out = model.encoder.outputs[0].name
        dec_outs = model.decoder.output_names[:2]

        def encode(feeds: dict) -> dict:
            with torch.no_grad():
                (tensor,) = feeds.values()
                return {enc_out: self.encoder(torch.from_numpy(tensor)).numpy()}

        def decode(feeds: dict) -> dict:
            with torch.no_grad():
                masks, iou = self.decoder(**{name: torch.from_numpy(np.ascontiguousarray(v)) for name, v in feeds.items()})
            return dict(zip(dec_outs, (masks.numpy(), iou.numpy())))

        self.predictor = SamPredictor(model, sessions_run({model.encoder.name: encode, model.decoder.name: decode}))

    def run(self, nifti_bytes: bytes, case: dict, warm: bool = False) -> dict:
        from service.core.domain import Box, Prompt
        from service.core.prompts import check_box
        from service.core.volume import VolumeSource, load_volume
        from service.inference import propagation as prop
        from service.inference.volume_predictor import VolumePredictor

        volume = load_volume(VolumeSource("nifti", data=nifti_bytes))   # what the gateway stores
        vp = VolumePredictor(self.predictor, volume)
        k = case["slice"]
        box = volume.box_to_model(check_box(Box(*case["box"]), 0, *volume.input_slice_shape))
        if warm:
            vp.box_mask(k, Prompt(box=box))
            return {}
        state = prop.State(bounds=(0, volume.depth - 1)).apply(prop.Interaction(k, box))
        times: list[float] = []
        start = time.perf_counter()
        results = prop.drive(prop.run_state(state, prop.Rules(), volume.slice_shape, {}), vp.embed, vp.decode,
                             on_slice=lambda _: times.append(time.perf_counter() - start))
        wall = time.perf_counter() - start
        slices = prop.slices_of(results.values())
        masks = np.zeros((volume.depth, *volume.input_slice_shape), dtype=bool)
        for j, r in slices.items():
            masks[j] = volume.mask_to_input(r.mask)
        enc = list(vp.encoder_s.values())
        return {"wall_s": wall, "first_slice_s": times[0] if times else None, "slices": len(slices),
                "slice_range": [min(slices), max(slices)] if slices else None,
                "encoder_sum_s": float(sum(enc)), "encoder_calls": len(enc), "decoder_sum_s": vp.decode_s,
                "decoder_calls": vp.decodes, "encoder_mean_s": float(np.mean(enc)) if enc else None,
                "decoder_mean_s": vp.decode_s / vp.decodes if vp.decodes else None,
                "stop_reasons": list(prop.stop_reasons(state, results)), "masks": masks}


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


def summarise(runs: list[dict]) -> dict:
    keys = ("wall_s", "first_slice_s", "encoder_sum_s", "decoder_sum_s", "encoder_mean_s", "decoder_mean_s")
    out = {k: _median(runs, k) for k in keys}
    out["wall_s_min"], out["wall_s_max"] = min(r["wall_s"] for r in runs), max(r["wall_s"] for r in runs)
    last = runs[-1]
    for k in ("slices", "slice_range", "encoder_calls", "decoder_calls", "stop_reasons"):
        out[k] = last[k]
    out["slices_per_s"] = out["slices"] / out["wall_s"] if out["wall_s"] else None
    return out


def bench_speed(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    from medseg_client import SegmentationClient

    folder = VOLUMES / args.subject
    image = folder / "image.nii.gz"
    case = reference_case(folder / "masks" / f"{args.structure}.nii.gz")
    nifti_bytes = image.read_bytes()
    import nibabel

    x, y, z = nibabel.load(str(image)).shape[:3]
    depth_hw = (z, y, x)
    results["case"] = {"subject": args.subject, "structure": args.structure, "slice": case["slice"],
                       "box": case["box"], "truth_slices": case["truth_slices"],
                       "truth_voxels": case["truth_voxels"], "depth": z}
    print(f"case: {args.subject} {args.structure}, box {case['box']} on slice {case['slice']} "
          f"(reference spans {case['truth_slices']})", flush=True)
    print("PyTorch reference: loading ...", flush=True)
    reference = TorchVolumeReference(threads=args.threads)
    reference.run(nifti_bytes, case, warm=True)
    print("gateway (--default-model auto): starting ...", flush=True)
    t = time.perf_counter()
    gw = GatewayProcess(tmp / "speed", "--default-model", "auto").start(timeout=120)
    try:
        gw.wait_serving(timeout=600)
        results["gateway_start_s"] = time.perf_counter() - t
        with SegmentationClient(gw.target, timeout=600) as client:
            (default,) = [m for m in client.list_models() if m.is_default]
            results["model"] = {"name": default.name, "description": default.description}
            print(f"  serving in {results['gateway_start_s']:.0f} s; default model {default.name}", flush=True)
            gateway_run(gw, client, image, case, depth_hw, warm=True)
            g_runs, r_runs = [], []
            for i in range(args.repeats):
                g = gateway_run(gw, client, image, case, depth_hw)
                print(f"  run {i + 1}: gateway {g['wall_s']:.2f} s, {g['slices']} slices, first slice "
                      f"{g['first_slice_s']:.3f} s", flush=True)
                r = reference.run(nifti_bytes, case)
                print(f"  run {i + 1}: reference {r['wall_s']:.2f} s, {r['slices']} slices, first slice "
                      f"{r['first_slice_s']:.3f} s", flush=True)
                g_runs.append(g)
                r_runs.append(r)
            results["gateway_peak_rss_mb"] = measure.peak_rss_mb([gw.proc.pid])
    finally:
        gw.stop()
    g_masks, r_masks = g_runs[-1].pop("masks"), r_runs[-1].pop("masks")
    for run in g_runs + r_runs:
        run.pop("masks", None)
    results["agreement"] = {"dice_gateway_vs_reference": dice(g_masks, r_masks),
                            "dice_gateway_vs_truth": dice(g_masks, case["truth"]),
                            "dice_reference_vs_truth": dice(r_masks, case["truth"]),
                            "gateway_embeddings_reused": max(r["embeddings_reused"] for r in g_runs)}
    results["gateway"] = {**summarise(g_runs), "runs": g_runs}
    results["reference"] = {**summarise(r_runs), "runs": r_runs}


# --------------------------------------------------------------------------- memory
def tiled_ct(shape: tuple[int, int, int]) -> np.ndarray:
    """int16 (Z, H, W): the real CT's input-convention slices tiled 2x2 in plane (crop/pad to
    H x W), slice j = CT slice j * 108 // Z (each slice repeated)."""
    import nibabel

    ct = input_slices(np.asanyarray(nibabel.load(str(VOLUMES / CT / "image.nii.gz")).dataobj).astype(np.int16))
    z, h, w = shape
    reps = (-(-h // ct.shape[1]), -(-w // ct.shape[2]))
    picks = np.arange(z) * ct.shape[0] // z
    return np.ascontiguousarray(np.stack([np.tile(ct[j], reps)[:h, :w] for j in picks]))


def write_nifti(voxels: np.ndarray, spacing: tuple[float, float, float], path: Path) -> None:
    """``voxels`` (Z, H, W) input convention as a .nii.gz whose NIfTI slices give them back."""
    import nibabel

    stored = np.ascontiguousarray(np.stack([np.flipud(s).T for s in voxels], axis=-1))
    nibabel.save(nibabel.Nifti1Image(stored, np.diag([*spacing, 1.0])), str(path))


def _rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def measure_upload(gw: GatewayProcess, client, source, spacing, nbytes: int, expire: bool,
                   ttl_s: float) -> dict:
    """Peak RSS of the gateway during one upload over the RSS before it; then its RSS once the
    volume is gone (``expire``: waited past the TTL and swept by a call naming it; else deleted)."""
    import grpc

    pid = gw.proc.pid
    time.sleep(1.0)
    baseline = _rss(pid)
    peak_reset = reset_peak(pid)
    start = time.perf_counter()
    info = client.upload_volume(source, spacing=spacing)
    upload_s = time.perf_counter() - start
    peak = proc_status(pid)["VmHWM"]
    held = _rss(pid)
    stored = metric_value(gw.metrics_text(), "medseg_volumes_stored_bytes")
    out = {"baseline_rss": baseline, "peak_hwm": peak, "peak_reset": peak_reset, "upload_s": upload_s,
           "peak_over_baseline": peak - baseline, "ratio": (peak - baseline) / nbytes,
           "rss_while_stored": held, "stored_bytes_reported": stored, "stored_bytes_info": info.stored_bytes,
           "release": "expired" if expire else "deleted"}
    if expire:
        time.sleep(info.expires_in_s + 1.0)
        try:
            client.get_segment_mask(info.volume_id, "none")
            out["not_found"] = False
        except grpc.RpcError as exc:
            out["not_found"] = exc.code() == grpc.StatusCode.NOT_FOUND
    else:
        out["deleted"] = client.delete_volume(info.volume_id)
    time.sleep(1.0)
    out["after_rss"] = _rss(pid)
    out["after_over_baseline"] = out["after_rss"] - baseline
    out["stored_bytes_after"] = metric_value(gw.metrics_text(), "medseg_volumes_stored_bytes")
    return out


def bench_memory(args: argparse.Namespace, tmp: Path, results: dict) -> None:
    from medseg_client import SegmentationClient

    shape = QUICK_MEMORY_SHAPE if args.quick else MEMORY_SHAPE
    voxels = tiled_ct(shape)
    spacing = (0.957 / 2, 0.957 / 2, 1.5 * 108 / shape[0])   # (sx, sy, sz) mm: column, row, slice
    nbytes = int(voxels.nbytes)
    mem: dict = {"shape": list(shape), "dtype": "int16", "volume_bytes": nbytes, "ttl_s": args.ttl_s}
    results["memory"] = mem
    nii = tmp / "tiled_ct.nii.gz"
    if not args.no_nifti:
        write_nifti(voxels, spacing, nii)
        mem["nifti_file_bytes"] = nii.stat().st_size
    tiny = tiled_ct((2, 16, 16))
    print(f"memory: {shape[0]}x{shape[1]}x{shape[2]} int16 ({nbytes / MiB:.0f} MiB), gateway with "
          f"--volume-ttl-s {args.ttl_s:g} ...", flush=True)
    gw = GatewayProcess(tmp / "memory", "--default-model", "auto", "--volume-ttl-s", f"{args.ttl_s:g}",
                        "--max-volume-bytes", str(4 * nbytes), "--max-volumes-bytes", str(8 * nbytes),
                        "--max-caller-volumes-bytes", str(8 * nbytes)).start(timeout=120)
    try:
        gw.wait_serving(timeout=600)
        with SegmentationClient(gw.target, timeout=600) as client:
            # warm the upload paths (first-use imports and buffers are not the volume's)
            for source, sp in ((tiny, spacing),) + (((nii, None),) if not args.no_nifti else ()):
                client.delete_volume(client.upload_volume(source, spacing=sp).volume_id)
            mem["start_rss"] = _rss(gw.proc.pid)
            mem["raw"] = measure_upload(gw, client, voxels, spacing, nbytes, expire=True, ttl_s=args.ttl_s)
            r = mem["raw"]
            print(f"  raw: peak +{r['peak_over_baseline'] / MiB:.0f} MiB = {r['ratio']:.2f}x; after expiry "
                  f"{r['after_over_baseline'] / MiB:+.0f} MiB vs baseline; stored bytes {r['stored_bytes_after']:.0f}",
                  flush=True)
            if not args.no_nifti:
                mem["nifti"] = measure_upload(gw, client, nii, None, nbytes, expire=False, ttl_s=args.ttl_s)
                n = mem["nifti"]
                print(f"  NIfTI: peak +{n['peak_over_baseline'] / MiB:.0f} MiB = {n['ratio']:.2f}x; after delete "
                      f"{n['after_over_baseline'] / MiB:+.0f} MiB vs baseline", flush=True)
    finally:
        gw.stop()


# --------------------------------------------------------------------------- the report
def _s(v: float | None, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f} s"


def _mib(n: float) -> str:
    return f"{round(n / MiB):+d} MiB"


def _held(u: dict) -> str:
    if "rss_while_stored" not in u:
        return "n/a"
    return _mib(u["rss_while_stored"] - u["baseline_rss"])


def _first_slice_runs(g: dict) -> list[str]:
    """One row per gateway run: its first slice against its own bound, and that slice's own
    encoder + decoder time (a /metrics scrape when it arrived)."""
    runs = [r for r in g.get("runs", []) if r.get("first_slice_bound_s") is not None]
    if not runs:
        return []
    parts = []
    for i, r in enumerate(runs, 1):
        own = ""
        if r.get("first_slice_encoder_s") is not None and r.get("first_slice_decoder_s") is not None:
            own = (f", its own encoder + decoder {1e3 * r['first_slice_encoder_s']:.0f} + "
                   f"{1e3 * r['first_slice_decoder_s']:.0f} ms")
        parts.append(f"run {i}: {1e3 * r['first_slice_s']:.0f} vs {1e3 * r['first_slice_bound_s']:.0f} ms{own} "
                     f"({'yes' if r['first_slice_within'] else 'NO'})")
    within = sum(bool(r["first_slice_within"]) for r in runs)
    return [f"| first slice within the bound, each run | {'; '.join(parts)} | | {within} of {len(runs)} runs |"]


def render_section(r: dict) -> str:
    """The ``## 3-D volumes`` section (without the markers) from a results dict."""
    mm = r.get("matmul_gflops", {})
    lines = ["## 3-D volumes", "",
             f"- Machine: {r['machine']}; fp32 matmul {mm.get('peak', float('nan')):.0f} GFLOP/s (PyTorch "
             f"{mm.get('pytorch', float('nan')):.0f}, ONNX Runtime {mm.get('onnxruntime', float('nan')):.0f}; "
             f"{mm.get('threads', '?')} threads)",
             f"- Date: {r['date']}",
             f"- Command: `{r['command']}`",
             f"- Load average (1/5/15 min) at start: {r.get('load_start', 'n/a')}, at end: {r.get('load_end', 'n/a')} "
             f"({r.get('cores', '?')} cores; a start value well above 0.5 means other jobs shared the CPU)"]
    if "gateway" not in r:
        lines.append("")
    if "gateway" in r:
        c, g, ref, m = r["case"], r["gateway"], r["reference"], r["model"]
        box = ", ".join(f"{v:g}" for v in c["box"])
        lines += [f"- Case: `{c['subject']}` `{c['structure']}` uploaded as NIfTI; one box = the reference box "
                  f"({box}) on slice {c['slice']}, the reference mask's largest (it spans slices "
                  f"{c['truth_slices'][0]}-{c['truth_slices'][1]}); SegmentVolume streaming, a fresh upload per run "
                  f"(no embedding reused), {len(g['runs'])} run(s) each, interleaved, medians.",
                  f"- Gateway: `python -m service --default-model auto` chose `{m['name']}` (ListModels "
                  f"`is_default`). Reference: PyTorch LiteMedSAM (fp32, {r.get('threads', 2)} threads) running the "
                  "same propagation (`propagation.run_state` + `drive`, the gateway's predictor code, torch "
                  "encoder and decoder).", ""]
        ratio = ref["wall_s"] / g["wall_s"]
        same = g["slices"] == ref["slices"] and g["slice_range"] == ref["slice_range"]
        rng = lambda x: f"{x['slices']} ({x['slice_range'][0]}-{x['slice_range'][1]})" if x["slice_range"] else "0"  # noqa: E731
        enc, dec = g["encoder_mean_s"] or 0.0, g["decoder_mean_s"] or 0.0
        bound = enc + dec + FIRST_SLICE_SLACK_S
        first = g["first_slice_s"]
        model_s = g["encoder_sum_s"] + g["decoder_sum_s"]
        per_slice = model_s / g["slices"]
        overhead = (g["wall_s"] - model_s) / g["slices"]
        a = r["agreement"]
        lines += ["| figure | gateway | PyTorch reference | gateway vs reference / target |",
                  "|---|---:|---:|---|",
                  f"| seconds per structure (call to summary) | {_s(g['wall_s'])} ({g['wall_s_min']:.2f}-"
                  f"{g['wall_s_max']:.2f}) | {_s(ref['wall_s'])} ({ref['wall_s_min']:.2f}-{ref['wall_s_max']:.2f}) | "
                  f"{ratio:.2f}x faster |",
                  f"| slices per second | {g['slices_per_s']:.2f} | {ref['slices_per_s']:.2f} | |",
                  f"| slices with a mask (range) | {rng(g)} | {rng(ref)} | "
                  f"{'same' if same else 'DIFFERENT'} |",
                  f"| encoder / decoder calls | {g['encoder_calls']} / {g['decoder_calls']} | "
                  f"{ref['encoder_calls']} / {ref['decoder_calls']} | |",
                  f"| encoder / decoder mean per call | {1e3 * enc:.0f} / {1e3 * dec:.1f} ms | "
                  f"{1e3 * (ref['encoder_mean_s'] or 0):.0f} / {1e3 * (ref['decoder_mean_s'] or 0):.1f} ms | |",
                  f"| time to the first streamed slice | {_s(first, 3)} | {_s(ref['first_slice_s'], 3)} | |",
                  f"| first slice within encoder + decoder + 100 ms (medians) | {1e3 * first:.0f} ms vs "
                  f"{1e3 * enc:.0f} + {1e3 * dec:.0f} + 100 = {1e3 * bound:.0f} ms | | "
                  f"{'yes' if first <= bound else 'NO'} |",
                  *_first_slice_runs(g),
                  f"| gateway overhead per slice: (wall - encoder - decoder stage sums) / slices | "
                  f"{1e3 * overhead:.1f} ms = {100 * overhead / per_slice:.1f}% of {1e3 * per_slice:.0f} ms model "
                  f"time per slice | | <= {100 * OVERHEAD_TARGET:.0f}%: "
                  f"{'met' if overhead <= OVERHEAD_TARGET * per_slice else 'NOT met'} |",
                  f"| 3-D Dice vs the reference mask | {a['dice_gateway_vs_truth']:.3f} | "
                  f"{a['dice_reference_vs_truth']:.3f} | gateway vs PyTorch: {a['dice_gateway_vs_reference']:.3f} |",
                  f"| why propagation stopped | {'; '.join(g['stop_reasons'])} | {'; '.join(ref['stop_reasons'])} | |",
                  ""]
    if "memory" in r:
        mem = r["memory"]
        z, h, w = mem["shape"]
        lines += [f"Memory: a {w}x{h}x{z} int16 volume ({mem['volume_bytes'] / MiB:.0f} MiB of voxels) tiled from "
                  f"the real CT `{CT}` (2x2 in plane, slices repeated), uploaded to a gateway started with "
                  f"`--volume-ttl-s {mem['ttl_s']:g}`; peak = VmHWM after `clear_refs` minus the RSS just before "
                  "the upload; after = RSS once the volume is gone (expired: waited past the TTL, then a call "
                  "naming it answered NOT_FOUND; or deleted) minus the same baseline.", "",
                  "| upload | baseline RSS | peak - baseline | x volume bytes (target <= 2.5x) | while stored - "
                  "baseline | RSS after | after - baseline | stored bytes after (`medseg_volumes_stored_bytes`) |",
                  "|---|---:|---:|---:|---:|---|---:|---:|"]
        for key, label in (("raw", "raw int16 array"), ("nifti", "NIfTI .nii.gz")):
            u = mem.get(key)
            if not u:
                continue
            if key == "nifti" and "nifti_file_bytes" in mem:
                label += f" ({mem['nifti_file_bytes'] / MiB:.0f} MiB file)"
            ok = "met" if u["ratio"] <= MEMORY_TARGET else "NOT met"
            gone = u["release"] + (", NOT_FOUND" if u.get("not_found") else "")
            lines.append(f"| {label} | {u['baseline_rss'] / MiB:.0f} MiB | {_mib(u['peak_over_baseline'])} | "
                         f"{u['ratio']:.2f}x: {ok}{'' if u.get('peak_reset', True) else ' (VmHWM not reset)'} | "
                         f"{_held(u)} | {u['after_rss'] / MiB:.0f} MiB ({gone}) | {_mib(u['after_over_baseline'])} | "
                         f"{u['stored_bytes_after']:.0f} |")
        lines.append("")
    for note in r.get("notes", []):
        lines.append(f"- {note}")
    if r.get("notes"):
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"



def notes(r: dict) -> list[str]:
    """Anomalies worth a line under the tables."""
    out = []
    start = float(str(r.get("load_start", "0")).split("/")[0])
    if start > 0.5:
        out.append(f"The 1-minute load average was {start:.1f} at the start on {r.get('cores', '?')} cores: other "
                   "jobs shared the CPU, so absolute times are inflated, and the ratio moves too (PyTorch's and ONNX "
                   "Runtime's threads suffer differently from a shared CPU).")
    if "gateway" in r:
        g, ref = r["gateway"], r["reference"]
        if (g["slices"], g["slice_range"]) != (ref["slices"], ref["slice_range"]):
            out.append(f"The slices differ: gateway {g['slices']} {g['slice_range']}, reference {ref['slices']} "
                       f"{ref['slice_range']} (the gateway's model `{r['model']['name']}` is not the fp32 network "
                       "the reference runs; the propagation rules stop on its own masks).")
        missed = [i for i, x in enumerate(g.get("runs", []), 1) if x.get("first_slice_within") is False]
        if missed:
            out.append(f"First slice over its bound in run(s) {', '.join(map(str, missed))}: compare that slice's own "
                       "encoder time (a /metrics scrape when it arrived) with the run's mean; a gateway idle while "
                       "the reference ran (runs are interleaved) starts its first encoder call cold.")
        if r["agreement"].get("gateway_embeddings_reused"):
            out.append("The gateway reused embeddings in a timed run (it should not: each run is a fresh upload).")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"development run: {QUICK_STRUCTURE}, one run each, a 60-slice memory volume")
    parser.add_argument("--structure", default=None,
                        help=f"colin27_t1 structure (masks/NAME.nii.gz; default {DEFAULT_STRUCTURE})")
    parser.add_argument("--subject", default=SUBJECT, help="volume folder under ../shared/data/volumes")
    parser.add_argument("--repeats", type=int, default=None, help="runs of each side (default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch threads of the reference")
    parser.add_argument("--ttl-s", type=float, default=20.0, help="--volume-ttl-s of the memory gateway")
    parser.add_argument("--no-nifti", action="store_true", help="memory: the raw upload only")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed part (development)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory part (development)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "volume_bench_results.json")
    parser.add_argument("--render-only", action="store_true", help="re-write the section from --json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.render_only:
        section = render_section(json.loads(args.json.read_text()))
        write_section(args.out, SECTION, section)
        print(section)
        return 0
    args.structure = args.structure or (QUICK_STRUCTURE if args.quick else DEFAULT_STRUCTURE)
    args.repeats = args.repeats or (1 if args.quick else 2)
    shown = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    ensure_models()
    results: dict = {"machine": measure.machine(), "date": dt.datetime.now().isoformat(timespec="seconds"),
                     "command": " ".join(["python bench/volume_bench.py", *shown]),
                     "load_start": measure.load_average(), "threads": args.threads, "cores": os.cpu_count()}
    print("matmul peak ...", flush=True)
    results["matmul_gflops"] = measure.matmul_gflops(threads=2)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_speed:
            bench_speed(args, Path(tmp), results)
        if not args.no_memory:
            bench_memory(args, Path(tmp), results)
    results["load_end"] = measure.load_average()
    results["seconds"] = time.perf_counter() - started
    results["notes"] = notes(results)
    args.json.write_text(json.dumps(results, indent=2))
    section = render_section(results)
    write_section(args.out, SECTION, section)
    print(section)
    print(f"({results['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
