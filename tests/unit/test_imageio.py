"""Tests of service.core.imageio: format sniffing, limits, error translation and normalisation."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.core.domain import DecodedImage, ImageInput, ImageLimits, RawPixels, Window
from service.core.errors import InvalidImage, PayloadTooLarge
from service.core.imageio import GZIP_EXPANSION, RAW_DTYPES, decode_image, dicom_window, normalise

RNG_SEED = 1234


# --------------------------------------------------------------------------- helpers
def decode(data: bytes, **kwargs) -> DecodedImage:
    return decode_image(ImageInput(encoded=data, **kwargs))


def decode_raw(array: np.ndarray, **kwargs) -> DecodedImage:
    array = np.ascontiguousarray(array)
    data = array.astype(array.dtype.newbyteorder("<")).tobytes()
    raw = RawPixels(dtype=array.dtype.name, shape=array.shape, data=data)
    return decode_image(ImageInput(raw=raw, **kwargs))


def percentile01(array: np.ndarray) -> np.ndarray:
    """The documented percentile rule, written independently of the module."""
    x = array.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.zeros(x.shape) if hi == lo else np.clip((x - lo) / (hi - lo), 0, 1)


def window01(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((values.astype(np.float64) - (center - width / 2)) / width, 0, 1)


def png_bytes(array: np.ndarray | Image.Image, **kwargs) -> bytes:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` 8-bit grey pixels but holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\x00" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def dicom_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def synthetic_dicom(array: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "OT") -> Dataset:
    """A minimal Part 10 dataset holding ``array`` ((H, W), (H, W, 3) or (frames, H, W))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Modality = modality
    ds.set_pixel_data(array, photometric_interpretation=photometric, bits_stored=array.dtype.itemsize * 8)
    return ds


def nifti_bytes(volume: np.ndarray, zooms: tuple[float, ...] | None = None, compress: bool = False) -> bytes:
    image = nib.Nifti1Image(volume, affine=np.eye(4))
    if zooms is not None:
        image.header.set_zooms(zooms)
    data = image.to_bytes()
    return gzip.compress(data, compresslevel=1) if compress else data


def nifti_header_only(shape: tuple[int, ...], dtype: type = np.int16, vox_offset: int = 352) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = vox_offset
    header["magic"] = b"n+1"
    return header.binaryblock + b"\x00" * 4


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="module")
def uncr(dicom_dir: Path) -> bytes:
    return (dicom_dir / "693_UNCR.dcm").read_bytes()


def dev_image(shared_data: Path, modality_prefix: str) -> np.ndarray:
    for path in sorted((shared_data / "dev").glob("dev_*.npz")):
        with np.load(path, allow_pickle=False) as case:
            if json.loads(str(case["meta"]))["modality"].startswith(modality_prefix):
                return case["image"]
    pytest.skip(f"no {modality_prefix} case in the dev set")


# --------------------------------------------------------------------------- DICOM
@pytest.mark.parametrize(
    ("name", "shape", "modality", "spacing"),
    [
        ("CT_small.dcm", (128, 128), "CT", (0.661468, 0.661468)),
        ("MR_small.dcm", (64, 64), "MR", (0.3125, 0.3125)),
        ("693_UNCR.dcm", (512, 512), "CT", (0.478516, 0.478516)),
    ],
)
def test_decode_real_dicom_files_gives_unit_range_images(dicom_dir, name, shape, modality, spacing):
    image = decode((dicom_dir / name).read_bytes())
    assert image.source_format == "dicom"
    assert image.pixels.shape == shape and image.pixels.dtype == np.float32
    assert image.pixels.flags.c_contiguous
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0
    assert image.modality == modality
    assert image.spacing_mm == pytest.approx(spacing)


def test_dicom_rescale_gives_hounsfield_units_and_the_file_window_applies(uncr):
    ds = pydicom.dcmread(io.BytesIO(uncr))
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    assert dicom_window(ds) == Window(center=40.0, width=100.0)  # the file's own (brain) window
    stored = np.frombuffer(ds.PixelData, dtype="<i2").reshape(512, 512)  # straight from the bytes
    hu = stored.astype(np.float64) * 1.0 - 1024.0
    image = decode(uncr)
    assert stored[256, 256] == 1048  # 24 HU: soft tissue, inside the window [-10, 90]
    assert image.pixels[256, 256] == pytest.approx((24.0 - (40.0 - 50.0)) / 100.0, abs=1e-6)
    np.testing.assert_allclose(image.pixels, window01(hu, 40.0, 100.0), atol=1e-6)
    assert image.pixels[stored == ds.PixelPaddingValue].max() == 0.0  # padding (-3024 HU) is black


def test_dicom_ct_without_a_window_uses_the_ct_default(uncr):
    ds = pydicom.dcmread(io.BytesIO(uncr))
    del ds.WindowCenter, ds.WindowWidth
    hu = ds.pixel_array.astype(np.float64) - 1024.0
    image = decode(dicom_bytes(ds))
    np.testing.assert_allclose(image.pixels, window01(hu, 40.0, 400.0), atol=1e-6)


def test_request_window_overrides_the_dicom_file_window(uncr):
    hu = pydicom.dcmread(io.BytesIO(uncr)).pixel_array.astype(np.float64) - 1024.0
    image = decode(uncr, window=Window(center=400.0, width=2000.0))
    np.testing.assert_allclose(image.pixels, window01(hu, 400.0, 2000.0), atol=1e-6)


def test_dicom_mr_uses_its_window_then_percentiles(dicom_dir):
    data = (dicom_dir / "MR_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    np.testing.assert_allclose(decode(data).pixels, window01(ds.pixel_array, 600.0, 1600.0), atol=1e-6)
    del ds.WindowCenter, ds.WindowWidth
    np.testing.assert_allclose(decode(dicom_bytes(ds)).pixels, percentile01(ds.pixel_array), atol=1e-6)


def test_dicom_voi_lut_sequence_is_applied_and_scaled_by_its_bit_depth(dicom_dir):
    ds = pydicom.dcmread(dicom_dir / "MR_small.dcm")
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new(0x00283006, "OW", (16 * np.arange(4096)).astype("<u2").tobytes())  # LUTData
    ds.VOILUTSequence = [item]
    expected = 16.0 * ds.pixel_array / 65535.0
    np.testing.assert_allclose(decode(dicom_bytes(ds)).pixels, expected, atol=1e-6)


def test_dicom_monochrome1_is_inverted(dicom_dir):
    data = (dicom_dir / "MR_small.dcm").read_bytes()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(decode(dicom_bytes(ds)).pixels, 1.0 - decode(data).pixels, atol=1e-6)


def test_dicom_multiframe_selects_the_requested_frame_default_middle():
    frames = np.stack([np.full((6, 9), 10 * k, dtype=np.uint16) for k in range(5)])
    frames[:, 0, 0] = 0
    data = dicom_bytes(synthetic_dicom(frames))
    window = Window(center=50.0, width=100.0)
    assert decode(data, window=window).pixels[1, 1] == pytest.approx(0.2)  # frame 2 of 0..4
    assert decode(data, window=window, slice_index=4).pixels[1, 1] == pytest.approx(0.4)
    with pytest.raises(InvalidImage):
        decode(data, slice_index=5)


def test_dicom_rgb_is_scaled_by_255():
    rgb = np.random.default_rng(RNG_SEED).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    image = decode(dicom_bytes(synthetic_dicom(rgb, photometric="RGB")))
    np.testing.assert_allclose(image.pixels, rgb / 255.0, atol=1e-7)
    assert image.modality == "OT" and image.spacing_mm is None


def test_decode_rejects_truncated_dicom(uncr):
    for cut in (len(uncr) // 2, 300, 140):
        with pytest.raises(InvalidImage):
            decode(uncr[:cut])


def test_decode_rejects_dicom_with_an_unsupported_transfer_syntax(uncr):
    ds = pydicom.dcmread(io.BytesIO(uncr))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4"
    with pytest.raises(InvalidImage, match="transfer syntax unknown"):
        decode(dicom_bytes(ds))


def test_decode_rejects_dicom_without_pixel_data(uncr):
    ds = pydicom.dcmread(io.BytesIO(uncr))
    del ds.PixelData
    with pytest.raises(InvalidImage):
        decode(dicom_bytes(ds))


# --------------------------------------------------------------------------- PNG / JPEG / TIFF
def test_png_8bit_grey_uses_the_percentile_rule():
    grey = np.random.default_rng(RNG_SEED).integers(0, 256, (20, 30), dtype=np.uint8)
    image = decode(png_bytes(grey))
    assert image.source_format == "png" and image.pixels.shape == (20, 30)
    np.testing.assert_allclose(image.pixels, percentile01(grey), atol=1e-6)


def test_png_16bit_keeps_full_precision():
    grey = (np.arange(200 * 300, dtype=np.uint16) % 4000).reshape(200, 300)
    image = decode(png_bytes(grey), window=Window(center=2000.0, width=4000.0))
    np.testing.assert_allclose(image.pixels, grey / 4000.0, atol=1e-6)
    assert len(np.unique(image.pixels)) == 4000


def test_png_rgb_is_scaled_by_255_and_alpha_is_dropped():
    rng = np.random.default_rng(RNG_SEED)
    rgba = rng.integers(0, 256, (9, 11, 4), dtype=np.uint8)
    for array in (rgba[..., :3], rgba):
        image = decode(png_bytes(array))
        assert image.pixels.shape == (9, 11, 3)
        np.testing.assert_allclose(image.pixels, rgba[..., :3] / 255.0, atol=1e-7)
    grey_alpha = decode(png_bytes(Image.fromarray(rgba[..., :2].copy(), mode="LA")))
    np.testing.assert_allclose(grey_alpha.pixels, percentile01(rgba[..., 0]), atol=1e-6)


def test_png_palette_is_converted_to_rgb():
    palette_image = Image.fromarray(np.random.default_rng(RNG_SEED).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    palette_image = palette_image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image = decode(png_bytes(palette_image))
    np.testing.assert_allclose(image.pixels, np.asarray(palette_image.convert("RGB")) / 255.0, atol=1e-7)


def test_jpeg_grey_and_rgb_decode_close_to_the_original():
    y, x = np.mgrid[0:64, 0:64]
    grey = (2 * x + y).astype(np.uint8)
    image = decode(png_bytes(grey, format="JPEG", quality=95))
    assert image.source_format == "jpeg" and image.pixels.shape == (64, 64)
    assert np.abs(image.pixels - percentile01(grey)).mean() < 0.02
    rgb = np.stack([grey, 255 - grey, np.full_like(grey, 128)], axis=-1)
    image = decode(png_bytes(rgb, format="JPEG", quality=95))
    assert image.pixels.shape == (64, 64, 3) and np.abs(image.pixels - rgb / 255.0).mean() < 0.02


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_tiff_grey_keeps_its_dtype_and_uses_the_percentile_rule(dtype):
    grey = (np.random.default_rng(RNG_SEED).normal(0, 1000, (16, 24)) + 100).clip(0, 255 if dtype == np.uint8 else 5000)
    grey = grey.astype(dtype)
    image = decode(tiff_bytes(grey))
    assert image.source_format == "tiff"
    np.testing.assert_allclose(image.pixels, percentile01(grey), atol=1e-6)


@pytest.mark.parametrize("planarconfig", ["contig", "separate"])
def test_tiff_rgb_and_rgba_are_scaled_by_255(planarconfig):
    rgba = np.random.default_rng(RNG_SEED).integers(0, 256, (10, 12, 4), dtype=np.uint8)
    for array, kwargs in ((rgba[..., :3], {"photometric": "rgb"}), (rgba, {"photometric": "rgb", "extrasamples": [2]})):
        stored = array if planarconfig == "contig" else np.moveaxis(array, -1, 0)
        data = tiff_bytes(stored, planarconfig=planarconfig, **kwargs)
        np.testing.assert_allclose(decode(data).pixels, rgba[..., :3] / 255.0, atol=1e-7)


@pytest.mark.parametrize("compression", ["tiff_lzw", "packbits", "tiff_adobe_deflate", "jpeg"])
def test_tiff_compressions_written_by_pillow_decode(compression):
    rgb = np.random.default_rng(RNG_SEED).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    image = decode(png_bytes(rgb, format="TIFF", compression=compression))
    assert image.source_format == "tiff" and image.pixels.shape == (16, 24, 3)
    tolerance = 0.1 if compression == "jpeg" else 1e-7
    assert np.abs(image.pixels - rgb / 255.0).mean() <= tolerance
    grey = (np.arange(16 * 24, dtype=np.uint16) * 97).reshape(16, 24)
    if compression != "jpeg":
        image = decode(png_bytes(grey, format="TIFF", compression=compression))
        np.testing.assert_allclose(image.pixels, percentile01(grey), atol=1e-6)


def test_tiff_palette_is_converted_to_rgb():
    index = np.random.default_rng(RNG_SEED).integers(0, 256, (8, 8), dtype=np.uint8)
    colormap = (np.arange(3 * 256).reshape(3, 256) * 257 % 65536).astype(np.uint16)
    image = decode(tiff_bytes(index, photometric="palette", colormap=colormap))
    np.testing.assert_allclose(image.pixels, (colormap[:, index] // 257).transpose(1, 2, 0) / 255.0, atol=1e-7)


def test_decode_rejects_truncated_png_jpeg_and_tiff():
    grey = np.random.default_rng(RNG_SEED).integers(0, 256, (64, 64), dtype=np.uint8)
    for data in (png_bytes(grey), png_bytes(grey, format="JPEG"), tiff_bytes(grey, compression="zlib")):
        with pytest.raises(InvalidImage):
            decode(data[: len(data) // 2])


def test_decode_rejects_png_declaring_100000_squared_without_allocating():
    with pytest.raises(PayloadTooLarge, match="100000x100000"):
        decode(png_header_only(100_000, 100_000))
    with pytest.raises(PayloadTooLarge):
        decode(png_header_only(9000, 10))  # over max_side, few pixels


@pytest.mark.parametrize("fmt", ["png", "jpeg", "tiff", "dicom", "nifti", "nifti.gz", "raw"])
def test_decode_rejects_images_over_the_size_limits(fmt):
    grey = np.zeros((40, 30), dtype=np.uint8)
    inputs = {
        "png": lambda: ImageInput(encoded=png_bytes(grey)),
        "jpeg": lambda: ImageInput(encoded=png_bytes(grey, format="JPEG")),
        "tiff": lambda: ImageInput(encoded=tiff_bytes(grey)),
        "dicom": lambda: ImageInput(encoded=dicom_bytes(synthetic_dicom(grey))),
        "nifti": lambda: ImageInput(encoded=nifti_bytes(grey.T)),
        "nifti.gz": lambda: ImageInput(encoded=nifti_bytes(grey.T, compress=True)),
        "raw": lambda: ImageInput(raw=RawPixels("uint8", (40, 30), grey.tobytes())),
    }
    image_input = inputs[fmt]()
    assert decode_image(image_input).pixels.shape == (40, 30)
    for limits in (ImageLimits(max_side=32), ImageLimits(max_pixels=1000)):
        with pytest.raises(PayloadTooLarge):
            decode_image(image_input, limits)


def test_decode_rejects_encoded_bytes_over_the_limit():
    with pytest.raises(PayloadTooLarge):
        decode_image(ImageInput(encoded=png_bytes(np.zeros((8, 8), np.uint8))), ImageLimits(max_encoded_bytes=20))


# --------------------------------------------------------------------------- NIfTI
def test_nifti_2d_orientation_and_spacing():
    volume = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # (i, j)
    for compress in (False, True):
        image = decode(nifti_bytes(volume, zooms=(2.0, 3.0), compress=compress), window=Window(5.5, 11.0))
        assert image.source_format == "nifti" and image.pixels.shape == (3, 4)
        np.testing.assert_allclose(image.pixels, volume.T[::-1] / 11.0, atol=1e-6)  # top row = highest j
        assert image.spacing_mm == (3.0, 2.0) and image.modality is None


@pytest.mark.parametrize("compress", [False, True])
def test_nifti_3d_selects_a_slice_along_the_last_axis(compress):
    volume = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    data = nifti_bytes(volume, zooms=(1.0, 2.0, 3.0), compress=compress)
    window = Window(center=29.5, width=59.0)
    for slice_index, k in ((None, 1), (0, 0), (2, 2)):
        image = decode(data, window=window, slice_index=slice_index)
        np.testing.assert_allclose(image.pixels, volume[:, :, k].T[::-1] / 59.0, atol=1e-6)
    assert image.spacing_mm == (2.0, 1.0)
    for bad in (3, -1):
        with pytest.raises(InvalidImage):
            decode(data, slice_index=bad)


def test_nifti_applies_scl_slope_and_inter():
    volume = np.arange(12, dtype=np.int16).reshape(4, 3, 1)
    image = nib.Nifti1Image(volume, np.eye(4))
    image.header.set_slope_inter(2.0, 10.0)
    decoded = decode(image.to_bytes(), window=Window(center=21.0, width=22.0))  # 10..32 -> 0..1
    np.testing.assert_allclose(decoded.pixels, (2.0 * volume[:, :, 0].T[::-1]) / 22.0, atol=1e-6)


def test_nifti_percentile_rule_and_trailing_singleton_axes():
    volume = np.random.default_rng(RNG_SEED).normal(size=(6, 5, 1, 1)).astype(np.float32)
    np.testing.assert_allclose(decode(nifti_bytes(volume)).pixels, percentile01(volume[:, :, 0, 0].T[::-1]), atol=1e-6)


def test_decode_rejects_4d_and_truncated_nifti():
    with pytest.raises(InvalidImage):
        decode(nifti_bytes(np.zeros((4, 4, 3, 2), np.float32)))
    data = nifti_bytes(np.zeros((16, 16, 4), np.float32))
    for truncated in (data[:-10], gzip.compress(data)[:-100], gzip.compress(data[:-10])):
        with pytest.raises(InvalidImage):
            decode(truncated)


def test_decode_rejects_gzip_bomb_nifti_without_inflating_it():
    # 10 MiB of zeros behind a header declaring a 1000 x 1000 x 5000 int16 volume (10 GB).
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(nifti_header_only((1000, 1000, 5000))) + bomb.compress(b"\x00" * (10 << 20)) + bomb.flush()
    assert len(data) < 64 * 1024
    with pytest.raises(PayloadTooLarge):
        decode(data)
    small_limits = ImageLimits(max_encoded_bytes=1 << 20)
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(nifti_header_only((1000, 1000, 3))) + bomb.compress(b"\x00" * (10 << 20)) + bomb.flush()
    assert 3 * 10**6 * 2 > GZIP_EXPANSION * small_limits.max_encoded_bytes
    with pytest.raises(PayloadTooLarge):
        decode_image(ImageInput(encoded=data), small_limits)


def test_nifti_gzip_trailing_data_beyond_the_declared_volume_is_not_inflated():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(nifti_header_only((4, 4))) + bomb.compress(b"\x00" * (64 << 20)) + bomb.flush()
    assert decode(data).pixels.shape == (4, 4)


def test_decode_rejects_nifti_with_a_data_offset_inside_the_header():
    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)
    data = bomb.compress(nifti_header_only((2, 2), np.uint8, vox_offset=344)) + bomb.compress(b"\x00" * (8 << 20))
    with pytest.raises(InvalidImage):
        decode(data + bomb.flush())


def test_decode_rejects_gzip_that_is_not_nifti():
    with pytest.raises(InvalidImage):
        decode(gzip.compress(b"hello world" * 100))


# --------------------------------------------------------------------------- raw arrays
@pytest.mark.parametrize("dtype", RAW_DTYPES)
def test_raw_arrays_of_every_dtype_use_the_percentile_rule(dtype):
    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    rng = np.random.default_rng(RNG_SEED)
    array = rng.uniform(max(float(info.min), -1e6), min(float(info.max), 1e6), (13, 17)).astype(dtype)
    image = decode_raw(array)
    assert image.source_format == "raw" and image.pixels.dtype == np.float32 and image.pixels.flags.c_contiguous
    np.testing.assert_allclose(image.pixels, percentile01(array), atol=1e-6)


def test_raw_uint8_rgb_is_scaled_by_255_other_rgb_jointly_by_percentiles():
    rgb = np.random.default_rng(RNG_SEED).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_allclose(decode_raw(rgb).pixels, rgb / 255.0, atol=1e-7)
    np.testing.assert_allclose(decode_raw(rgb.astype(np.int16)).pixels, percentile01(rgb), atol=1e-6)
    windowed = decode_raw(rgb, window=Window(100.0, 50.0)).pixels
    np.testing.assert_allclose(windowed, window01(rgb, 100.0, 50.0), atol=1e-6)


def test_raw_extreme_float64_values_stay_finite():
    array = np.array([[-1.7e308, 0.0], [1.0, 1.7e308]])
    pixels = decode_raw(array).pixels
    assert np.isfinite(pixels).all() and pixels.min() >= 0 and pixels.max() <= 1


def test_constant_image_becomes_zeros():
    for array in (np.full((4, 5), 7, np.int16), np.zeros((3, 3), np.float32)):
        pixels = decode_raw(array).pixels
        assert not np.isnan(pixels).any() and (pixels == 0).all()


@pytest.mark.parametrize(
    "raw",
    [
        RawPixels("uint8", (4, 4), b"\x00" * 15),  # wrong length
        RawPixels("uint8", (4, 4), b"\x00" * 17),
        RawPixels("int64", (2, 2), b"\x00" * 32),  # unknown dtype
        RawPixels("float16", (2, 2), b"\x00" * 8),
        RawPixels(">u2", (2, 2), b"\x00" * 8),
        RawPixels("uint8", (2, 2, 3, 1), b"\x00" * 12),  # 4-D
        RawPixels("uint8", (2, 2, 4), b"\x00" * 16),  # 4 channels
        RawPixels("uint8", (4,), b"\x00" * 4),  # 1-D
        RawPixels("uint8", (0, 4), b""),  # zero side
        RawPixels("uint8", (-2, -2), b"\x00" * 4),
        RawPixels("float32", (1, 2), np.array([1.0, np.nan], "<f4").tobytes()),
        RawPixels("float64", (1, 2), np.array([np.inf, 0.0], "<f8").tobytes()),
        RawPixels("float32", (1, 2), np.array([-np.inf, 0.0], "<f4").tobytes()),
    ],
)
def test_decode_rejects_malformed_raw_arrays(raw):
    with pytest.raises(InvalidImage):
        decode_image(ImageInput(raw=raw))


def test_dev_images_as_raw_match_the_same_array_as_png_and_tiff(shared_data):
    ct = dev_image(shared_data, "CT")  # int16 HU
    assert ct.dtype == np.int16
    from_raw = decode_raw(ct).pixels
    as_uint16 = (ct.astype(np.int32) + 1024).astype(np.uint16)  # the percentile rule is shift-invariant
    np.testing.assert_allclose(decode(png_bytes(as_uint16)).pixels, from_raw, atol=1e-5)
    np.testing.assert_array_equal(decode(tiff_bytes(ct)).pixels, from_raw)
    window = Window(center=40.0, width=400.0)
    np.testing.assert_array_equal(decode(tiff_bytes(ct), window=window).pixels, decode_raw(ct, window=window).pixels)
    mri = dev_image(shared_data, "MRI")
    assert mri.dtype == np.uint8
    np.testing.assert_array_equal(decode(png_bytes(mri)).pixels, decode_raw(mri).pixels)
    np.testing.assert_array_equal(normalise(mri, None), decode_raw(mri).pixels)


# --------------------------------------------------------------------------- requests
def test_decode_rejects_empty_missing_both_and_unrecognised_inputs():
    png = png_bytes(np.zeros((2, 2), np.uint8))
    for bad in (
        ImageInput(),
        ImageInput(encoded=png, raw=RawPixels("uint8", (1, 1), b"\x00")),
        ImageInput(encoded=b""),
        ImageInput(encoded=np.random.default_rng(RNG_SEED).bytes(1000)),
        ImageInput(encoded=b"GIF89a" + b"\x00" * 100),
    ):
        with pytest.raises(InvalidImage):
            decode_image(bad)


@pytest.mark.parametrize(
    "window", [Window(40.0, 0.0), Window(40.0, -5.0), Window(float("nan"), 10.0), Window(0.0, float("inf"))]
)
def test_decode_rejects_bad_windows(window):
    with pytest.raises(InvalidImage):
        decode_raw(np.zeros((2, 2), np.uint8), window=window)
    with pytest.raises(InvalidImage):
        normalise(np.zeros((2, 2), np.uint8), window)


def test_slice_index_on_a_2d_image_must_be_zero():
    png = png_bytes(np.zeros((3, 3), np.uint8))
    assert decode(png, slice_index=0).pixels.shape == (3, 3)
    with pytest.raises(InvalidImage):
        decode(png, slice_index=1)
    with pytest.raises(InvalidImage):
        decode_raw(np.zeros((3, 3), np.uint8), slice_index=1)


# --------------------------------------------------------------------------- property
def _small_samples() -> list[bytes]:
    grey = np.random.default_rng(RNG_SEED).integers(0, 256, (6, 5), dtype=np.uint8)
    return [
        png_bytes(grey),
        png_bytes(grey, format="JPEG"),
        tiff_bytes(grey),
        dicom_bytes(synthetic_dicom(grey.astype(np.int16), modality="CT")),
        nifti_bytes(grey.astype(np.float32)),
        nifti_bytes(grey.astype(np.int16), compress=True),
    ]


SAMPLES = _small_samples()
PREFIXES = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"\x00" * 128 + b"DICM", b"\x1f\x8b"]
HYPOTHESIS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_or_domain_error(data: bytes) -> None:
    try:
        image = decode(data)
    except (InvalidImage, PayloadTooLarge):
        return
    assert image.pixels.dtype == np.float32 and np.isfinite(image.pixels).all()
    assert image.pixels.size == 0 or (image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0)


@HYPOTHESIS
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=600))
def test_arbitrary_bytes_decode_or_raise_a_domain_error(prefix, body):
    _decodes_or_domain_error(prefix + body)


@HYPOTHESIS
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=6),
    cut=st.floats(0.05, 1.0),
)
def test_corrupted_valid_files_decode_or_raise_a_domain_error(sample, edits, cut):
    data = bytearray(sample)
    for where, value in edits:
        data[int(where * len(data))] = value
    _decodes_or_domain_error(bytes(data[: max(1, int(cut * len(data)))]))
