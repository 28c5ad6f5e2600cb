"""Fuzz inputs for the image decoders, one per seed: a small valid file of some format and
transfer syntax, then (most of the time) mutated.

Kinds: DICOM uncompressed (explicit/implicit VR), RLE, JPEG baseline, JPEG-LS, JPEG 2000,
deflated; TIFF written by tifffile (none/zlib/LZMA/PackBits, strips or tiles, predictor,
planar) and by Pillow (LZW, JPEG, PackBits, Adobe deflate); PNG; JPEG (baseline and
progressive); NIfTI (.nii.gz). Mutations: ``none`` (the valid file: the decoder must accept
most of these), ``attrs`` (DICOM pixel attributes or transfer syntax drawn independently of
the data), ``codestream`` (a compressed frame's SOF/SIZ/RLE header enlarged or altered, scans
repeated), ``tags`` (TIFF IFD values overwritten in place), ``bytes`` (a few bytes
overwritten), ``truncate``, and ``bomb`` (deflate/LZMA/PackBits/RLE payloads that inflate far
beyond what the headers declare, zTXt chunks, huge declared sizes).

``make_case(seed)`` is deterministic; bench/fuzz_campaign.py runs thousands of seeds and
tests/unit/test_fuzz.py draws seeds with hypothesis. Nothing here imports the gateway.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pydicom
import tifffile
from PIL import Image
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame

__all__ = ["KINDS", "MUTATIONS", "Case", "make_case"]

KINDS = ("dicom_native", "dicom_rle", "dicom_jpeg", "dicom_jpegls", "dicom_j2k", "dicom_deflated",
         "tiff", "tiff_pillow", "png", "jpeg", "nifti_gz")
MUTATIONS = ("none", "attrs", "codestream", "tags", "bytes", "truncate", "bomb")
ENCAPSULATED = {"dicom_rle": dicom_uid.RLELossless, "dicom_jpeg": dicom_uid.JPEGBaseline8Bit,
                "dicom_jpegls": dicom_uid.JPEGLSLossless, "dicom_j2k": dicom_uid.JPEG2000Lossless}


@dataclass(frozen=True)
class Case:
    seed: int
    kind: str
    mutation: str
    data: bytes


def make_case(seed: int, kind: str | None = None, mutation: str | None = None) -> Case:
    rng = random.Random(seed)
    kind = kind or rng.choice(KINDS)
    mutation = mutation or rng.choices(MUTATIONS, weights=(30, 15, 15, 10, 15, 8, 7))[0]
    data = _BUILDERS[kind](rng, mutation)
    if mutation == "bytes":
        data = _flip(rng, data)
    elif mutation == "truncate":
        data = data[: rng.randint(1, max(1, len(data) - 1))]
    return Case(seed, kind, mutation, data)


# --------------------------------------------------------------------------- helpers
def _array(rng: random.Random, shape: tuple[int, ...], dtype: str, noise: float = 0.3) -> np.ndarray:
    gen = np.random.default_rng(rng.getrandbits(32))
    kind = np.dtype(dtype)
    if kind.kind == "f":
        return gen.normal(100, 50, shape).astype(dtype)
    info = np.iinfo(kind)
    low, high = max(info.min, -2000), min(info.max, 4000 if kind.itemsize > 1 else info.max)
    smooth = np.linspace(low, high, num=int(np.prod(shape))).reshape(shape)  # compressible, not constant
    noise_share, noise = noise, gen.integers(low, high, shape, endpoint=True)
    return np.where(gen.random(shape) < noise_share, noise, smooth).astype(dtype)


def _flip(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def _dataset(syntax: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = dicom_uid.SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    ds.SOPClassUID = dicom_uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.PatientName = "FUZZ^CANARY"
    ds.Modality = "OT"
    return ds


def _write(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _pixels_ds(rng: random.Random, syntax: str, *, bits: int | None = None, rgb: bool | None = None,
               frames: int | None = None, signed: bool | None = None, min_side: int = 1,
               smooth: bool = False) -> Dataset:
    rows, cols = rng.randint(min_side, max(40, min_side + 8)), rng.randint(min_side, max(40, min_side + 8))
    rgb = rng.random() < 0.3 if rgb is None else rgb
    bits = bits or (8 if rgb else rng.choice([8, 16]))
    frames = frames or rng.choice([1, 1, 1, 2, 3])
    signed = (bits == 16 and rng.random() < 0.5) if signed is None else signed
    dtype = {8: "u1", 16: "i2" if signed else "u2"}[bits]
    shape = (rows, cols, 3) if rgb else (rows, cols)
    array = _array(rng, (frames, *shape) if frames > 1 else shape, dtype, noise=0.0 if smooth else 0.3)
    ds = _dataset(syntax)
    ds.Modality = rng.choice(["CT", "MR", "OT"])
    ds.set_pixel_data(array, photometric_interpretation="RGB" if rgb else "MONOCHROME2", bits_stored=bits)
    if rng.random() < 0.3:
        ds.RescaleSlope, ds.RescaleIntercept = rng.choice(["1", "2", "0.5"]), rng.choice(["0", "-1024"])
    if rng.random() < 0.3:
        ds.WindowCenter, ds.WindowWidth = rng.choice(["40", "100"]), rng.choice(["400", "1"])
    return ds


def _mutate_attrs(rng: random.Random, ds: Dataset) -> None:
    for _ in range(rng.randint(1, 3)):
        choice = rng.randrange(7)
        if choice == 0:
            ds.Rows = max(0, min(65535, rng.choice([0, 1, int(ds.Rows) - 1, int(ds.Rows) + 1, 60000, 65535])))
        elif choice == 1:
            ds.Columns = max(0, min(65535, rng.choice([0, 1, int(ds.Columns) - 1, int(ds.Columns) + 7, 65535])))
        elif choice == 2:
            ds.SamplesPerPixel = rng.choice([0, 1, 3, 4, 255])
        elif choice == 3:
            ds.BitsAllocated = rng.choice([1, 8, 12, 16, 32, 64, 0])
        elif choice == 4:
            ds.BitsStored = rng.choice([0, 1, 8, 12, 16, 40])
        elif choice == 5:
            ds.NumberOfFrames = rng.choice([0, 1, 2, 5, 100000])
        else:
            ds.PhotometricInterpretation = rng.choice(["MONOCHROME1", "RGB", "YBR_FULL_422", "PALETTE COLOR", "HSV",
                                                       ""])


def _find_jpeg_sof(frame: bytes) -> int:
    pos = 2
    while pos + 4 <= len(frame):
        marker = frame[pos + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            return pos
        if marker == 0xFF:
            pos += 1
            continue
        pos += 2 + struct.unpack(">H", frame[pos + 2:pos + 4])[0]
    return -1


def _mutate_codestream(rng: random.Random, frame: bytes, kind: str) -> bytes:
    out = bytearray(frame)
    big = rng.choice([60000, 65535, 4096, 41, 2])
    if kind in ("dicom_jpeg", "dicom_jpegls"):
        sof = _find_jpeg_sof(frame)
        if sof >= 0:
            field = rng.randrange(4)
            if field == 0:
                out[sof + 5:sof + 7] = struct.pack(">H", big)  # height
            elif field == 1:
                out[sof + 7:sof + 9] = struct.pack(">H", big)  # width
            elif field == 2:
                out[sof + 9] = rng.choice([0, 2, 3, 4, 255])  # components
            else:
                out[sof + 4] = rng.choice([2, 12, 16, 17, 255])  # precision
        if rng.random() < 0.3:  # repeat the last scan many times
            sos = frame.rfind(b"\xff\xda")
            if sos > 0:
                eoi = frame.rfind(b"\xff\xd9")
                scan = frame[sos:eoi if eoi > sos else len(frame)]
                out = out[:sos] + scan * rng.choice([2, 70, 200]) + b"\xff\xd9"
    elif kind == "dicom_j2k":
        siz = frame.find(b"\xff\x4f\xff\x51")
        if siz >= 0:
            field = rng.randrange(4)
            if field == 0:
                out[siz + 8:siz + 16] = struct.pack(">II", big, big)  # Xsiz, Ysiz
            elif field == 1:
                out[siz + 24:siz + 32] = struct.pack(">II", rng.choice([1, 2, 3]), rng.choice([1, 2]))  # tiles
            elif field == 2:
                out[siz + 40:siz + 42] = struct.pack(">H", rng.choice([0, 2, 4, 16384]))  # Csiz
            else:
                out[siz + 42] = rng.choice([0, 15, 37, 127])  # Ssiz: precision
    elif kind == "dicom_rle":
        out[0:4] = struct.pack("<I", rng.choice([0, 2, 3, 15, 16, 2**31]))
    return bytes(out)


# --------------------------------------------------------------------------- DICOM
def _dicom_native(rng: random.Random, mutation: str) -> bytes:
    syntax = rng.choice([dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian])
    ds = _pixels_ds(rng, syntax)
    if mutation == "attrs":
        _mutate_attrs(rng, ds)
    elif mutation == "codestream":
        ds.PixelData = ds.PixelData[: rng.randrange(len(ds.PixelData) + 1)]
    elif mutation == "bomb":
        ds.NumberOfFrames = 10000
        ds.Rows = ds.Columns = 1024
    return _write(ds)


def _dicom_encapsulated(kind: str):
    def build(rng: random.Random, mutation: str) -> bytes:
        syntax = ENCAPSULATED[kind]
        if kind == "dicom_jpeg":
            ds = _jpeg_dicom(rng)
        else:
            ds = _compressed_ds(rng, kind, syntax)
        if mutation == "attrs":
            _mutate_attrs(rng, ds)
            if rng.random() < 0.3:  # the frames labelled with another compressed syntax
                ds.file_meta.TransferSyntaxUID = rng.choice(list(ENCAPSULATED.values()) + [dicom_uid.JPEGLSNearLossless,
                                                                                           dicom_uid.HTJ2K,
                                                                                           dicom_uid.MPEG2MPML])
        elif mutation in ("codestream", "bomb"):
            frames = int(ds.get("NumberOfFrames") or 1)
            index = rng.randrange(frames)
            frame_list = [get_frame(ds.PixelData, i, number_of_frames=frames) for i in range(frames)]
            if mutation == "codestream":
                frame_list[index] = _mutate_codestream(rng, frame_list[index], kind)
            else:
                frame_list = [_bomb_frame(rng, kind, ds) for _ in range(frames)]
            ds.PixelData = encapsulate(frame_list)
        return _write(ds)

    return build


def _compressed_ds(rng: random.Random, kind: str, syntax: str) -> Dataset:
    """A data set compressed with ``syntax`` by pydicom's encoders (RLE: pydicom, JPEG-LS:
    pyjpegls, JPEG 2000: pylibjpeg-openjpeg); OpenJPEG needs 32 pixels a side at its default
    resolution levels and CharLS fails on some tiny noisy images: those are drawn again."""
    for attempt in range(4):
        ds = _pixels_ds(rng, dicom_uid.ExplicitVRLittleEndian, min_side=32 if kind == "dicom_j2k" else 1,
                        bits=8 if kind == "dicom_j2k" and rng.random() < 0.5 else None, smooth=attempt > 1)
        try:
            ds.compress(syntax, generate_instance_uid=False)
            return ds
        except RuntimeError:
            continue
    raise RuntimeError(f"cannot encode a {kind} case")


def _jpeg_dicom(rng: random.Random) -> Dataset:
    rgb = rng.random() < 0.4
    rows, cols = rng.randint(1, 48), rng.randint(1, 48)
    frames = rng.choice([1, 1, 2])
    encoded = []
    for _ in range(frames):
        array = _array(rng, (rows, cols, 3) if rgb else (rows, cols), "u1")
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=rng.randint(50, 95),
                                    progressive=rng.random() < 0.2)
        encoded.append(buffer.getvalue())
    ds = _dataset(dicom_uid.JPEGBaseline8Bit)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "YBR_FULL_422" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    return ds


def _bomb_frame(rng: random.Random, kind: str, ds: Dataset) -> bytes:
    if kind == "dicom_rle":  # segments whose runs decode to far more than Rows x Columns
        segments = int(ds.SamplesPerPixel) * int(ds.BitsAllocated) // 8
        body = b"\x81\x00" * rng.choice([1000, 100000])
        header = struct.pack("<16I", segments, *[64 + i * len(body) for i in range(segments)], *[0] * (15 - segments))
        return header + body * segments
    if kind == "dicom_j2k":
        return _mutate_codestream(random.Random(rng.random()), _tiny_j2k(), kind)
    frame = _mutate_codestream(rng, _tiny_jpeg(kind == "dicom_jpegls"), kind)
    sof = _find_jpeg_sof(frame)
    if sof >= 0:
        frame = frame[:sof + 5] + struct.pack(">HH", 60000, 60000) + frame[sof + 9:]
    return frame


@functools.lru_cache(maxsize=None)
def _tiny_jpeg(jpeg_ls: bool) -> bytes:
    array = np.full((16, 16), 100, np.uint8)
    if jpeg_ls:
        ds = _dataset(dicom_uid.ExplicitVRLittleEndian)
        ds.set_pixel_data(array, photometric_interpretation="MONOCHROME2", bits_stored=8)
        ds.compress(dicom_uid.JPEGLSLossless, generate_instance_uid=False)
        return get_frame(ds.PixelData, 0, number_of_frames=1)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


@functools.lru_cache(maxsize=None)
def _tiny_j2k() -> bytes:
    ds = _dataset(dicom_uid.ExplicitVRLittleEndian)
    ds.set_pixel_data(np.full((32, 32), 100, np.uint8), photometric_interpretation="MONOCHROME2", bits_stored=8)
    ds.compress(dicom_uid.JPEG2000Lossless, generate_instance_uid=False)
    return get_frame(ds.PixelData, 0, number_of_frames=1)


def _dicom_deflated(rng: random.Random, mutation: str) -> bytes:
    ds = _pixels_ds(rng, dicom_uid.DeflatedExplicitVRLittleEndian)
    if mutation == "attrs":
        _mutate_attrs(rng, ds)
    if mutation != "bomb":
        return _write(ds)
    data = _write(ds)
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    where = rng.choice(["after", "before"])
    return data[:meta_end] + _deflate_bomb(body, where, rng.choice([16, 64]))


@functools.lru_cache(maxsize=64)
def _deflate_bomb(body: bytes, where: str, mib: int) -> bytes:
    """``body`` (an explicit-VR little-endian data set ending with its Pixel Data) deflated
    with ``mib`` MiB of zeros in an OB element before or after the Pixel Data."""
    size = mib << 20
    if where == "after":  # Data Set Trailing Padding
        prefix, suffix = body + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, size), b""
    else:  # a private element just before (7FE0,0010)
        at = body.rfind(b"\xe0\x7f\x10\x00")
        prefix = body[:at] + struct.pack("<HH2sHI", 0x7FDF, 0x0010, b"OB", 0, size)
        suffix = body[at:]
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    parts = [deflater.compress(prefix)] + [deflater.compress(chunk) for _ in range(mib)]
    return b"".join(parts) + deflater.compress(suffix) + deflater.flush()


# --------------------------------------------------------------------------- TIFF
_TIFF_DTYPES = ("u1", "u2", "i2", "f4", "u4", "f8")


def _tiff(rng: random.Random, mutation: str) -> bytes:
    if mutation == "bomb":
        return _tiff_bomb(rng.choice(["zlib", "lzma", "packbits"]), rng.choice([1, 8]))
    dtype = rng.choice(_TIFF_DTYPES)
    samples = rng.choice([1, 1, 3, 4]) if dtype == "u1" else rng.choice([1, 1, 3])
    rows, cols = rng.randint(1, 64), rng.randint(1, 64)
    array = _array(rng, (rows, cols, samples) if samples > 1 else (rows, cols), dtype)
    kwargs: dict = {"compression": rng.choice([None, "zlib", "lzma"])}  # PackBits: written by Pillow below
    if samples > 1:
        kwargs["photometric"] = "rgb"
        if samples == 4:
            kwargs["extrasamples"] = [2]
        if rng.random() < 0.3:
            kwargs["planarconfig"] = "separate"
            array = np.moveaxis(array, -1, 0)
    if rng.random() < 0.3:
        kwargs["tile"] = (16 * rng.randint(1, 3), 16 * rng.randint(1, 3))
    elif rng.random() < 0.5:
        kwargs["rowsperstrip"] = rng.randint(1, rows)
    if kwargs["compression"] in ("zlib", "lzma") and dtype in ("u1", "u2", "i2", "u4") and rng.random() < 0.5:
        kwargs["predictor"] = True
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    data = buffer.getvalue()
    return _tiff_tags(rng, data) if mutation in ("tags", "attrs", "codestream") else data


def _tiff_tags(rng: random.Random, data: bytes) -> bytes:
    """Overwrite some of the first IFD's values in place."""
    out = bytearray(data)
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        tags = [t for t in tif.pages.first.tags.values()
                if t.code in (256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 317, 322, 323, 338, 339, 32997)]
        for tag in rng.sample(tags, min(len(tags), rng.randint(1, 3))):
            size = {3: 2, 4: 4, 16: 8}.get(tag.dtype, 2)
            value = rng.choice([0, 1, 2, 3, 4, 5, 7, 8, 16, 32, 64, 255, 256, 1024, 60000, 65535, 2**31 - 1])
            value = min(value, 2 ** (8 * size) - 1)
            order = "<" if data[:2] == b"II" else ">"
            fmt = {2: "H", 4: "I", 8: "Q"}[size]
            out[tag.valueoffset:tag.valueoffset + size] = struct.pack(order + fmt, value)
    return bytes(out)


@functools.lru_cache(maxsize=None)
def _tiff_bomb(compression: str, mib: int) -> bytes:
    """A 256x256 uint8 TIFF whose one strip decodes to ``mib`` MiB (declared: 64 KiB)."""
    size = mib << 20
    if compression == "packbits":
        strip = b"\x81\x00" * (size // 128)
        code = 32773
    elif compression == "lzma":
        import lzma

        strip = lzma.compress(bytes(size), preset=1)
        code = 34925
    else:
        deflater = zlib.compressobj(9)
        chunk = bytes(1 << 20)
        strip = b"".join(deflater.compress(chunk) for _ in range(mib)) + deflater.flush()
        code = 8
    # hand-written little-endian TIFF: header, one IFD, then the strip
    entries = [(256, 3, 1, 256), (257, 3, 1, 256), (258, 3, 1, 8), (259, 3, 1, code), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, 256), (279, 4, 1, len(strip))]
    ifd_size = 2 + 12 * len(entries) + 4
    strip_offset = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for code_, kind, count, value in entries:
        value = strip_offset if code_ == 273 else value
        ifd += struct.pack("<HHI", code_, kind, count) + (struct.pack("<HH", value, 0) if kind == 3
                                                          else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def _tiff_pillow(rng: random.Random, mutation: str) -> bytes:
    mode = rng.choice(["L", "RGB", "I;16"])
    rows, cols = rng.randint(1, 64), rng.randint(1, 64)
    if mode == "RGB":
        image = Image.fromarray(_array(rng, (rows, cols, 3), "u1"))
    elif mode == "L":
        image = Image.fromarray(_array(rng, (rows, cols), "u1"))
    else:
        image = Image.fromarray(_array(rng, (rows, cols), "u2"))
    compressions = ["tiff_lzw", "packbits", "tiff_adobe_deflate"] + (["jpeg"] if mode != "I;16" else [])
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF", compression=rng.choice(compressions))
    data = buffer.getvalue()
    return _tiff_tags(rng, data) if mutation in ("tags", "attrs", "codestream", "bomb") else data


# --------------------------------------------------------------------------- PNG, JPEG, NIfTI
def _png(rng: random.Random, mutation: str) -> bytes:
    mode = rng.choice(["L", "RGB", "RGBA", "I;16", "P", "LA"])
    rows, cols = rng.randint(1, 48), rng.randint(1, 48)
    if mode == "I;16":
        image = Image.fromarray(_array(rng, (rows, cols), "u2"))
    elif mode in ("RGB", "RGBA", "LA"):
        image = Image.fromarray(_array(rng, (rows, cols, len(mode)), "u1"), mode=mode)
    else:
        image = Image.fromarray(_array(rng, (rows, cols), "u1")).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    if mutation == "bomb":  # zTXt chunks that inflate to 1 MiB each
        text = _ztxt_chunk()
        data = data[:33] + text * rng.choice([4, 40, 80]) + data[33:]
    elif mutation in ("attrs", "tags", "codestream"):  # IHDR width/height (CRC left stale or fixed)
        out = bytearray(data)
        out[16 + 4 * rng.randrange(2):][:4] = struct.pack(">I", rng.choice([0, 1, 9000, 60000, 2**31 - 1]))
        if rng.random() < 0.5:
            out[29:33] = struct.pack(">I", zlib.crc32(bytes(out[12:29])))
        data = bytes(out)
    return data


@functools.lru_cache(maxsize=None)
def _ztxt_chunk() -> bytes:
    body = b"Comment\x00\x00" + zlib.compress(bytes(1 << 20), 9)
    return struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))


def _jpeg(rng: random.Random, mutation: str) -> bytes:
    rgb = rng.random() < 0.5
    rows, cols = rng.randint(1, 64), rng.randint(1, 64)
    image = Image.fromarray(_array(rng, (rows, cols, 3) if rgb else (rows, cols), "u1"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(30, 95), progressive=rng.random() < 0.5)
    data = buffer.getvalue()
    if mutation in ("attrs", "codestream", "tags", "bomb"):
        data = _mutate_codestream(rng, data, "dicom_jpeg")
    return data


def _nifti_gz(rng: random.Random, mutation: str) -> bytes:
    import nibabel as nib

    shape = (rng.randint(1, 32), rng.randint(1, 32), rng.randint(1, 4))
    volume = _array(rng, shape, rng.choice(["u1", "i2", "f4"]))
    data = nib.Nifti1Image(volume, affine=np.eye(4)).to_bytes()
    if mutation == "bomb":  # a header declaring a big volume, then zeros
        header = bytearray(data[:352])
        header[40:56] = struct.pack("<8h", 3, 1000, 1000, 1000, 1, 1, 1, 1)
        deflater = zlib.compressobj(9, zlib.DEFLATED, 31)
        return deflater.compress(bytes(header)) + deflater.compress(bytes(16 << 20)) + deflater.flush()
    if mutation in ("attrs", "tags", "codestream"):
        out = bytearray(data)
        offset = rng.choice([40, 42, 44, 46, 70, 72, 108])
        out[offset:offset + 2] = struct.pack("<h", rng.choice([0, -1, 7, 16, 32767]))
        data = bytes(out)
    import gzip

    return gzip.compress(data, compresslevel=1)


_BUILDERS = {
    "dicom_native": _dicom_native,
    "dicom_deflated": _dicom_deflated,
    **{kind: _dicom_encapsulated(kind) for kind in ENCAPSULATED},
    "tiff": _tiff,
    "tiff_pillow": _tiff_pillow,
    "png": _png,
    "jpeg": _jpeg,
    "nifti_gz": _nifti_gz,
}
