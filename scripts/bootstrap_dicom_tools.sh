#!/usr/bin/env bash
# Install the DICOM tools the tests (and `make pacs`) need:
#   * dciodvfy from Debian's `dicom3tools` (DICOM IOD validator): the tests call it on every
#     DICOM object the product writes (tests/unit/test_dicom_seg.py),
#   * dcmdump from Debian's `dcmtk`,
#   * a real PACS: Debian's `orthanc` (the `Orthanc` binary) and `orthanc-dicomweb` (its
#     DICOMweb plugin, /usr/share/orthanc/plugins/libOrthancDicomWeb.so), which
#     bench/orthanc.py starts on loopback for tests/integration/test_pacs_client.py and
#     `make pacs`. The package's own service is not used (where an init system runs, apt may
#     start it on Orthanc's default ports; `systemctl disable --now orthanc` stops it):
#     OrthancProcess runs `Orthanc CONFIG.json` on free ports itself and stops it by PID.
# What CI runs before the test suite. apt-get; needs root. Idempotent: nothing is done when
# all of them are there.
# Environment: SKIP_APT=1 to leave system packages alone (then all must already be installed).
set -euo pipefail

DICOMWEB_PLUGIN=/usr/share/orthanc/plugins/libOrthancDicomWeb.so

missing=()
command -v dciodvfy >/dev/null || missing+=(dicom3tools)
command -v dcmdump >/dev/null || missing+=(dcmtk)
# /usr/sbin is not on every user's PATH
orthanc_bin=$(command -v Orthanc || { [ -x /usr/sbin/Orthanc ] && echo /usr/sbin/Orthanc; } || true)
[ -n "$orthanc_bin" ] || missing+=(orthanc)
[ -f "$DICOMWEB_PLUGIN" ] || missing+=(orthanc-dicomweb)

if [ "${#missing[@]}" -gt 0 ]; then
  what="missing: Debian's ${missing[*]} (dciodvfy, dcmdump, Orthanc, its DICOMweb plugin)"
  if [ "${SKIP_APT:-0}" = 1 ]; then
    echo "bootstrap_dicom_tools: $what and SKIP_APT=1: install the package(s) yourself" >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null; then
    echo "bootstrap_dicom_tools: $what and no apt-get here: install dicom3tools (dciodvfy), dcmtk (dcmdump)," \
         "Orthanc and its DICOMweb plugin with this system's package manager" >&2
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap_dicom_tools: $what: run 'sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}'" >&2
    exit 1
  fi
  echo "bootstrap_dicom_tools: installing Debian's ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

echo "bootstrap_dicom_tools: ready:"
echo "  dciodvfy $(dpkg-query -W -f='${Version}' dicom3tools 2>/dev/null || echo '(version unknown)') ($(command -v dciodvfy))"
echo "  $(dcmdump --version 2>&1 | head -1)"
echo "  Orthanc $(dpkg-query -W -f='${Version}' orthanc 2>/dev/null || echo '(version unknown)') ($(command -v Orthanc || echo /usr/sbin/Orthanc))," \
     "DICOMweb plugin $(dpkg-query -W -f='${Version}' orthanc-dicomweb 2>/dev/null || echo '(version unknown)') ($DICOMWEB_PLUGIN)"
