"""Bad and abandoned volume calls against a real gateway: status, still serving, RSS after.

A gateway (``--default-model medsam_lite``) gets a colin27 upload and one whole SegmentVolume
(the warm baseline), then rounds of: an upload cut mid-file, an upload of two series, an
over-size declared upload, a box outside the slice, an unknown volume_id, and a SegmentVolume
cancelled after its first slice; and, with a real Orthanc PACS behind the gateway
(bench/orthanc.py), SegmentStudy of an unknown series, with a UID that is not one, with the
SEG refused by the PACS (a Lua filter), abandoned by its client mid-way (a 0.3 s deadline), and
a successful one (its volume forgotten afterwards), plus a DICOM SEG asked of a NIfTI volume.
After each round a one-slice SegmentVolume must still answer; RSS is read after every round. Writes the table into
docs/RELIABILITY.md between ``<!-- volume-hostile:begin -->`` and ``<!-- volume-hostile:end -->``.

    .venv/bin/python bench/volume_hostile.py [--rounds N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import grpc
import nibabel
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.docs import write_section  # noqa: E402
from bench.harness import GatewayProcess, ensure_models, proc_status  # noqa: E402
from bench.measure import machine  # noqa: E402
from bench.orthanc import OrthancProcess  # noqa: E402
from medseg_client._generated import segmentation_pb2 as pb  # noqa: E402
from export.dev_cases import SHARED_DATA  # noqa: E402
from medseg_client import SegmentationClient  # noqa: E402
from medseg_client._generated import volumes_pb2 as vpb  # noqa: E402
from medseg_client._generated import volumes_pb2_grpc as vpb_grpc  # noqa: E402

SECTION = "volume-hostile"  # markers in the doc (bench.docs)


def mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def code_of(fn) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as exc:
        return exc.code().name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "RELIABILITY.md")
    args = parser.parse_args(argv)
    ensure_models()
    volumes = SHARED_DATA / "volumes"
    image = volumes / "colin27_t1" / "image.nii.gz"
    series = sorted((volumes / "dicom" / "promed_ct_0051").iterdir())
    ref = np.asarray(nibabel.load(volumes / "colin27_t1" / "masks" / "thalamus_left.nii.gz").dataobj) > 0
    k = int(np.argmax(ref.sum(axis=(0, 1))))
    sl = np.flipud(ref[:, :, k].T)
    rows, cols = np.flatnonzero(sl.any(axis=1)), np.flatnonzero(sl.any(axis=0))
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    refused = "REFUSED BY THE BENCH PACS"
    with tempfile.TemporaryDirectory() as tmp:
        lua = Path(tmp) / "filter.lua"
        lua.write_text(f"function ReceivedInstanceFilter(dicom, origin, info)\n"
                       f"  return dicom.SeriesDescription ~= '{refused}'\nend\n")
        pacs = OrthancProcess(Path(tmp), LuaScripts=[str(lua)]).start()
        pacs.stow(series)
        import pydicom
        first = pydicom.dcmread(series[0], stop_before_pixels=True)
        study_uid, series_uid = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        gateway = GatewayProcess(Path(tmp), "--default-model", "medsam_lite", "--pacs-url", pacs.url,
                                 "--pacs-username", pacs.username, "--pacs-password-file",
                                 str(pacs.password_file)).start()
        try:
            gateway.wait_serving()
            pid = gateway.proc.pid
            client = SegmentationClient(gateway.target, timeout=300)
            stub = vpb_grpc.VolumesStub(client._channel)
            info = client.upload_volume(image)
            list(client.segment_volume(info.volume_id, slice_index=k, box=box))  # warm: every slice embedded once
            rows_out = []

            def cut():
                head = vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_NIFTI))
                part = vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=image.read_bytes()[:100000],
                                                                      end_of_file=False))
                stub.UploadVolume(iter([head, part]), timeout=60)

            def two_series():
                import pydicom
                from pydicom.filebase import DicomBytesIO
                msgs = [vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_DICOM_SERIES))]
                for i, path in enumerate(series[:6]):
                    ds = pydicom.dcmread(path)
                    if i % 2:
                        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
                    buf = DicomBytesIO()
                    ds.save_as(buf)
                    msgs.append(vpb.UploadVolumeRequest(file_part=vpb.FilePart(data=buf.getvalue(), end_of_file=True)))
                stub.UploadVolume(iter(msgs), timeout=60)

            def oversize():
                head = vpb.UploadVolumeRequest(header=vpb.VolumeHeader(format=vpb.VOLUME_FORMAT_NIFTI,
                                                                       total_bytes=1 << 40))
                stub.UploadVolume(iter([head]), timeout=60)

            def outside():
                list(client.segment_volume(info.volume_id, slice_index=k, box=(5000, 5000, 5100, 5100)))

            def unknown():
                list(client.segment_volume("0" * 32, slice_index=k, box=box))

            def cancelled():
                stream = client.segment_volume(info.volume_id, slice_index=k, box=box)
                next(stream)
                stream.cancel()
                list(stream)

            def study(deadline: float = 120.0, **fields):
                base = dict(study_instance_uid=study_uid, series_instance_uid=series_uid, slice_index=54,
                            box=pb.Box(x0=60, y0=60, x1=200, y1=200), range=vpb.SliceRange(first=54, last=54))
                base.update(fields)
                stub.SegmentStudy(vpb.SegmentStudyRequest(**base), timeout=deadline)

            def study_ok():
                study(store=True)

            def study_unknown():
                study(series_instance_uid="1.2.826.0.1.3680043.8.498.999")

            def study_bad_uid():
                study(study_instance_uid="not-a-uid")

            def study_refused():
                study(store=True, dicom_seg_options=pb.DicomSegOptions(series_description=refused))

            def study_abandoned():
                study(deadline=0.3, range=vpb.SliceRange(first=40, last=70))

            def seg_of_nifti():
                stream = client.segment_volume(info.volume_id, slice_index=k, box=box, range=(k, k))
                list(stream)
                stub.GetSegmentMask(vpb.GetSegmentMaskRequest(volume_id=info.volume_id,
                                                              segment_id=stream.summary.segment_id, dicom_seg=True),
                                    timeout=60)

            def alive():
                list(client.segment_volume(info.volume_id, slice_index=k, box=box, range=(k, k)))

            cases = [("upload cut mid-file", cut), ("upload of two series", two_series),
                     ("declared upload over --max-volume-bytes", oversize), ("box outside the slice", outside),
                     ("unknown volume_id", unknown), ("SegmentVolume cancelled after its first slice", cancelled),
                     ("SegmentStudy, stored (its volume forgotten after)", study_ok),
                     ("SegmentStudy of an unknown series", study_unknown),
                     ("SegmentStudy with a study UID that is not one", study_bad_uid),
                     ("SegmentStudy whose SEG the PACS refuses", study_refused),
                     ("SegmentStudy abandoned by its client (0.3 s deadline)", study_abandoned),
                     ("GetSegmentMask(dicom_seg) of a NIfTI volume", seg_of_nifti)]
            study_ok()   # warm: the PACS, SEG and STOW paths once
            baseline = proc_status(pid)["VmRSS"]
            codes: dict[str, set[str]] = {name: set() for name, _ in cases}
            rss = []
            for _ in range(args.rounds):
                for name, fn in cases:
                    codes[name].add(code_of(fn))
                time.sleep(1.0)  # a cancelled call's thread ends within one slice
                serving = code_of(alive) == "OK"
                rss.append((proc_status(pid)["VmRSS"], serving))
            for name, _ in cases:
                rows_out.append(f"| {name} | {', '.join(sorted(codes[name]))} |")
            client.close()
        finally:
            gateway.stop()
            pacs.stop()
    after = [r for r, _ in rss]
    lines = ["", "## Volumes: bad and abandoned calls", "",
             f"Measured {dt.datetime.now().isoformat(timespec='minutes')} on {machine()}; command: "
             f"`python bench/volume_hostile.py --rounds {args.rounds}`. A real gateway, a colin27 volume uploaded "
             "and segmented once (warm: every slice embedded) and one SegmentStudy through a real Orthanc, then each "
             "call below once per round; after each round a one-slice SegmentVolume must answer.", "",
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
