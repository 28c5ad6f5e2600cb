"""A real PACS on this machine for trying the gateway's PACS calls: Orthanc with DICOMweb
(bench/orthanc.py), in the foreground until Ctrl-C. ``make pacs`` runs it::

    python scripts/pacs.py [--port 8042] [--load DICOM_FILE_OR_FOLDER ...]

It prints the DICOMweb URL, the user, the password file and the gateway flags that use them.
Loopback only, HTTP basic auth with a random password; its data lives in a temporary
directory that is removed when it stops.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/pacs.py` from anywhere
    sys.path.insert(0, str(REPO))

from bench.orthanc import OrthancMissing, OrthancProcess  # noqa: E402


def dicom_files(paths: list[Path]) -> list[Path]:
    """The files named, and the ``*.dcm`` files under the folders named."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.rglob("*.dcm") if p.is_file()) if path.is_dir() else [path])
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make pacs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--load", type=Path, action="append", default=[],
                        help="DICOM file or folder (its *.dcm files) to STOW-RS into the PACS at start; repeatable")
    args = parser.parse_args(argv)
    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt  # stop as for Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also where the shell started it ignoring SIGINT
    try:
        pacs = OrthancProcess(http_port=args.port)
    except OSError as exc:
        print(f"pacs: cannot create its temporary directory: {exc}", file=sys.stderr)
        return 1
    try:
        pacs.start()
        files = dicom_files(args.load)
        if files:
            print(f"pacs: storing {len(files)} DICOM files ...", flush=True)
            print(f"pacs: stored {pacs.stow(files)} instances", flush=True)
        print(f"""
Orthanc {pacs.http_url} (PID {pacs.pid}) with DICOMweb (QIDO-RS, WADO-RS, STOW-RS) at:
  URL            {pacs.url}
  username       {pacs.username}
  password file  {pacs.password_file}   (mode 0600; removed on stop)

Gateway flags:
  --pacs-url {pacs.url} --pacs-username {pacs.username} --pacs-password-file {pacs.password_file}

Loopback only; its data is in {pacs.tmp} until it stops. Ctrl-C stops it.""", flush=True)
        code = pacs.proc.wait()
        print(f"pacs: Orthanc exited with {code}:\n{pacs.log()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\npacs: stopping Orthanc", flush=True)
        return 0
    except OrthancMissing as exc:
        print(f"pacs: {exc}", file=sys.stderr)
        return 1
    finally:
        pacs.stop()


if __name__ == "__main__":
    sys.exit(main())
