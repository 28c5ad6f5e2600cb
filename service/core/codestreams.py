"""What a compressed image's own codestream header says it will decode to, read before any
decoder allocates: JPEG (SOF, scans, DNL), JPEG-LS (SOF55 and its oversize-dimension segment)
and JPEG 2000 (SIZ, tile count). :mod:`service.core.imageio` refuses a DICOM frame or a JPEG file
whose header is larger than the container declares or than the image limits allow.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.core.errors import InvalidImage, PayloadTooLarge

MAX_JPEG_SCANS = 64  # libjpeg's progressive scripts use 6-10 scans
MAX_J2K_TILES = 4096  # OpenJPEG allocates per-tile coding parameters up front


@dataclass(frozen=True)
class Codestream:
    """What a compressed image's own header says the decoder will produce."""

    kind: str
    width: int
    height: int
    components: int
    precision: int
    scans: int = 1
    tiles: int = 1


JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF,
                       0xDE,  # DHP: the whole image of a hierarchical JPEG
                       0xF7})  # JPEG-LS SOF55
# The next marker after a scan's entropy-coded data: there 0xFF is followed by 0x00 (stuffing),
# RSTn (0xD0-0xD7) or, in JPEG-LS, a byte below 0x80 (bit stuffing); markers are 0xFFC0-0xFFFE.
NEXT_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd8-\xfe]")


def jpeg_header(data: bytes, what: str) -> Codestream:
    """Walk a JPEG / JPEG-LS codestream's markers: frame size (SOF, DHP, JPEG-LS LSE oversize
    dimensions), components, precision and the number of scans. Refuses no-SOF, DNL-defined
    heights and more than :data:`MAX_JPEG_SCANS` scans."""
    if data[:2] != b"\xff\xd8":
        raise InvalidImage(f"{what} is not a JPEG codestream (no SOI marker)")
    pos, end = 2, len(data)
    width = height = components = precision = scans = 0
    seen_frame, kind = False, "JPEG"
    while pos + 1 < end:
        if data[pos] != 0xFF:  # extraneous bytes before a marker: skipped, as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                break
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD8:  # not a marker, TEM, RSTn, a stray SOI: no length
            pos += 2
            continue
        if pos + 4 > end:
            break
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            raise InvalidImage(f"{what}: the JPEG marker structure is corrupt")
        segment = data[pos + 4:pos + 2 + length]
        if marker in JPEG_SOF:
            if len(segment) < 6:
                raise InvalidImage(f"{what}: the JPEG frame header is truncated")
            p, y, x, nf = segment[0], (segment[1] << 8) | segment[2], (segment[3] << 8) | segment[4], segment[5]
            precision, components = max(precision, p), max(components, nf)
            width, height = max(width, x), max(height, y)
            seen_frame, kind = True, "JPEG-LS" if marker == 0xF7 else kind
        elif marker == 0xF8 and len(segment) >= 2 and segment[0] == 4:  # JPEG-LS LSE: oversize dimensions
            wxy = segment[1]
            if not 2 <= wxy <= 4 or len(segment) < 2 + 2 * wxy:
                raise InvalidImage(f"{what}: the JPEG-LS oversize-dimension segment is corrupt")
            height = max(height, int.from_bytes(segment[2:2 + wxy], "big"))
            width = max(width, int.from_bytes(segment[2 + wxy:2 + 2 * wxy], "big"))
        elif marker == 0xDA:  # SOS: skip the entropy-coded data to the next marker
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise PayloadTooLarge(f"{what}: the JPEG data has more than {MAX_JPEG_SCANS} scans; "
                                      f"at most {MAX_JPEG_SCANS} are decoded")
            found = NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                break
            pos = found.start()
            continue
        pos += 2 + length
    if not seen_frame:
        raise InvalidImage(f"{what}: the JPEG data has no frame header (SOF)")
    if height == 0 or width == 0:
        raise InvalidImage(f"{what}: a JPEG frame of {width}x{height} pixels (height defined by a DNL marker) "
                           "is not supported")
    return Codestream(kind, width, height, components, precision, scans=max(scans, 1))


def j2k_header(data: bytes, what: str) -> Codestream:
    """A JPEG 2000 / HTJ2K codestream's SIZ marker: image and tile grid, components, precision."""
    start = data.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 file's jp2c box)
    if start < 0:
        raise InvalidImage(f"{what} is not a JPEG 2000 codestream (no SOC/SIZ marker)")
    pos = start + 4
    if len(data) < pos + 38:
        raise InvalidImage(f"{what}: the JPEG 2000 SIZ marker is truncated")
    xsiz, ysiz, xo, yo, xt, yt, xto, yto = struct.unpack_from(">8I", data, pos + 4)
    csiz = struct.unpack_from(">H", data, pos + 36)[0]
    width, height = xsiz - xo, ysiz - yo
    if (csiz < 1 or width < 1 or height < 1 or xt < 1 or yt < 1 or xto > xo or yto > yo
            or xto + xt <= xo or yto + yt <= yo):
        raise InvalidImage(f"{what}: the JPEG 2000 SIZ marker is invalid")
    tiles = -(-(xsiz - xto) // xt) * -(-(ysiz - yto) // yt)
    comps = data[pos + 38:pos + 38 + 3 * min(csiz, 16)]
    if len(comps) < 3 * min(csiz, 16):
        raise InvalidImage(f"{what}: the JPEG 2000 SIZ marker is truncated")
    precision = max((comps[i] & 0x7F) + 1 for i in range(0, len(comps), 3))
    if any(comps[i] == 0 for i in range(1, len(comps), 3)) or any(comps[i] == 0 for i in range(2, len(comps), 3)):
        raise InvalidImage(f"{what}: the JPEG 2000 SIZ marker is invalid (component subsampling 0)")
    return Codestream("JPEG 2000", width, height, csiz, precision, tiles=tiles)
