"""Bad and abandoned calls to a SAM model's new entry points against a real gateway: status,
still serving, RSS after each round.

A tiny random SAM (the real ``segment_anything`` classes at reduced width, written by
``export.sam.random_checkpoint`` and exported by ``python -m export sam``) is served beside
LiteMedSAM. Warm-up: clicks, box + click, all three candidates, a volume segmented and refined with
clicks. Then rounds of: multimask on LiteMedSAM, a point on LiteMedSAM, a point outside the image,
a NaN point, multimask with a DICOM SEG, a multimask call abandoned by its client (50 ms deadline),
clicks on a LiteMedSAM volume segment, clicks outside the slice, clicks with no points; after each
round a click must still answer. Writes the table into docs/RELIABILITY.md between
``<!-- sam-hostile:begin -->`` and ``<!-- sam-hostile:end -->``::

    .venv/bin/python bench/sam_hostile.py [--rounds N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from bench.harness import MODEL_REPOSITORY, GatewayProcess, ensure_models, proc_status  # noqa: E402
from bench.measure import machine  # noqa: E402
from medseg_client import SegmentationClient, image_from_array  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402

SECTION = "sam-hostile"  # markers in the doc (bench.docs)
TINY = "sam_vit_tiny"


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def code_of(fn) -> str:
    try:
        out = fn()
        if hasattr(out, "__iter__") and not isinstance(out, (bytes, str)) and hasattr(out, "summary"):
            list(out)  # a stream: read it to its end (errors arrive while reading)
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def tiny_repository(work: Path) -> Path:
    from export.sam import random_checkpoint

    repository = work / "repository"
    checkpoint = random_checkpoint("vit_tiny", work / "tiny.pth")
    subprocess.run([sys.executable, "-m", "export", "sam", "--checkpoint", str(checkpoint), "--variant", "vit_tiny",
                    "--repository", str(repository), "--check-cases", "0"], cwd=REPO, check=True,
                   capture_output=True)
    for name in ("medsam_lite_encoder", "medsam_lite_decoder"):
        (repository / name).symlink_to(MODEL_REPOSITORY / name, target_is_directory=True)
    return repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    args = parser.parse_args(argv)
    ensure_models()
    rng = np.random.default_rng(0)
    image = (rng.random((180, 240)) * 60).astype(np.uint8)
    image[50:120, 70:170] += 150
    img = image_from_array(image)
    volume = np.stack([image.astype(np.int16)] * 6)
    rows_out = []
    with tempfile.TemporaryDirectory() as tmp:
        repository = tiny_repository(Path(tmp))
        gateway = GatewayProcess(Path(tmp) / "gateway", "--model-repository", str(repository), "--default-model",
                                 "medsam_lite")
        with gateway.serving():
            pid = gateway.proc.pid
            client = SegmentationClient(gateway.target, timeout=60.0)
            click = [(120, 85, 1)]

            def multimask_on_lite():
                client.segment(image=img, model="medsam_lite", boxes=[(70, 50, 170, 120)], multimask_output=True)

            def point_on_lite():
                client.segment(image=img, model="medsam_lite", points=click)

            def point_outside():
                client.segment(image=img, model=TINY, points=[(500, 10, 1)])

            def nan_point():
                client.segment(image=img, model=TINY, points=[(float("nan"), 10, 1)])

            def multimask_seg():
                request = pb.SegmentRequest(model=TINY, image=img, multimask_output=True,
                                            encoding=pb.MASK_ENCODING_DICOM_SEG,
                                            prompts=[pb.Prompt(points=[pb.Point(x=120, y=85, positive=True)])])
                client._stub.Segment(request, timeout=30)

            def abandoned():
                noisy = image.copy()
                noisy[0, 0] = rng.integers(0, 255)  # a new image: the encoder runs when the client leaves
                client.segment(image=image_from_array(noisy), model=TINY, points=click, multimask_output=True,
                               timeout=0.05)

            lite = client.upload_volume(volume, spacing=(1.0, 1.0, 2.0))
            lite_stream = client.segment_volume(lite.volume_id, slice_index=2, box=(70, 50, 170, 120),
                                                model="medsam_lite")
            list(lite_stream)
            lite_segment = lite_stream.summary.segment_id
            sam = client.upload_volume(volume, spacing=(1.0, 1.0, 2.0))
            sam_stream = client.segment_volume(sam.volume_id, slice_index=2, box=(70, 50, 170, 120), model=TINY)
            list(sam_stream)
            sam_segment = sam_stream.summary.segment_id

            def clicks_on_lite_segment():
                return client.add_points(lite.volume_id, lite_segment, 2, click)

            def clicks_outside_slice():
                return client.add_points(sam.volume_id, sam_segment, 2, [(900, 900, 1)])

            def clicks_unknown_slice():
                return client.add_points(sam.volume_id, sam_segment, 99, click)

            def alive():
                client.segment(image=img, model=TINY, points=click)

            cases = [("Segment multimask_output on LiteMedSAM", multimask_on_lite),
                     ("Segment with a point on LiteMedSAM", point_on_lite),
                     ("Segment SAM, point outside the image", point_outside),
                     ("Segment SAM, NaN point", nan_point),
                     ("Segment SAM, multimask_output with DICOM SEG", multimask_seg),
                     ("Segment SAM, multimask on a new image abandoned by its client (50 ms deadline)", abandoned),
                     ("RefineSegment add_points on a LiteMedSAM segment", clicks_on_lite_segment),
                     ("RefineSegment add_points outside the slice", clicks_outside_slice),
                     ("RefineSegment add_points on a slice beyond the volume", clicks_unknown_slice)]
            # warm: every good path once (clicks, box + click, three candidates, a 3-D click)
            client.segment(image=img, model=TINY, points=click)
            client.segment(image=img, model=TINY, boxes=[(70, 50, 170, 120)], points=click)
            client.segment(image=img, model=TINY, points=click, multimask_output=True)
            list(client.add_points(sam.volume_id, sam_segment, 2, [(120, 85, 1), (60, 30, 0)]))
            for _, fn in cases:
                code_of(fn)
            time.sleep(1.0)
            baseline = proc_status(pid)["VmRSS"]
            codes: dict[str, set[str]] = {name: set() for name, _ in cases}
            rss = []
            for _ in range(args.rounds):
                for name, fn in cases:
                    codes[name].add(code_of(fn))
                time.sleep(1.0)  # an abandoned call's encoder run ends
                serving = code_of(alive) == "OK"
                rss.append((proc_status(pid)["VmRSS"], serving))
            for name, _ in cases:
                rows_out.append(f"| {name} | {', '.join(sorted(codes[name]))} |")
            client.close()
    after = [r for r, _ in rss]
    lines = ["", "## SAM models: bad and abandoned calls", "",
             f"Measured {dt.datetime.now().isoformat(timespec='minutes')} on {machine()}; command: "
             f"`python bench/sam_hostile.py --rounds {args.rounds}`. A real gateway serving a tiny random SAM "
             "(real segment_anything classes, reduced width) beside LiteMedSAM; warm-up: every good SAM path once "
             "and each call below once; then each call once per round; after each round a click must answer.", "",
             "| call | status |", "|---|---|", *rows_out, "",
             f"Warm baseline RSS {mib(baseline)}; after each of the {args.rounds} rounds: "
             + ", ".join(f"{mib(r)} ({(r - baseline) / 2**20:+.0f} MiB)" for r in after)
             + f"; still serving after every round: {'yes' if all(s for _, s in rss) else 'NO'}.", ""]
    text = "\n".join(lines)
    print(text)
    write_section(args.out, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
