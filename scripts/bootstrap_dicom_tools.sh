#!/usr/bin/env bash
# Install the DICOM validators the tests call on every DICOM object the product writes
# (tests/unit/test_dicom_seg.py; what CI runs before the test suite):
#   * dciodvfy from Debian's `dicom3tools` (DICOM IOD validator),
#   * dcmdump from Debian's `dcmtk`.
# apt-get; needs root. Idempotent: nothing is done when both are on PATH.
# Environment: SKIP_APT=1 to leave system packages alone (then both must already be on PATH).
set -euo pipefail

missing=()
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dcmdump >/dev/null || missing+=(dcmtk)

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "${SKIP_APT:-0}" = 1 ]; then
    echo "bootstrap_dicom_tools: dciodvfy/dcmdump missing and SKIP_APT=1: install Debian's ${missing[*]} package(s)" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "bootstrap_dicom_tools: dciodvfy/dcmdump missing and no apt-get here: install dicom3tools (dciodvfy) and dcmtk (dcmdump) with this system's package manager" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap_dicom_tools: dciodvfy/dcmdump missing: run 'sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}'" >&2
    exit 1
  fi
  echo "bootstrap_dicom_tools: installing Debian's ${missing[*]} (dciodvfy, dcmdump)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "bootstrap_dicom_tools: ready:"
echo "  dciodvfy $(dpkg-query -W -f='${Version}' dicom3tools 2>/dev/null || echo '(version unknown)') ($(command -v dciodvfy))"
echo "  $(dcmdump --version 2>&1 | head -1)"
