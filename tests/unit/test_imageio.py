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


# --------------------------------------------------------------------------- every transfer syntax
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"  # shipped with pydicom (no download)


def pydicom_file(name: str) -> bytes:
    path = PYDICOM_FILES / name
    assert path.is_file(), f"pydicom no longer ships {name}"
    return path.read_bytes()


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm"])
def test_compressed_and_other_syntaxes_decode_to_the_uncompressed_pixels(name):
    """Lossless RLE, JPEG 2000, JPEG-LS and the other uncompressed encodings of MR_small
    decode to exactly the pixels of the uncompressed file."""
    reference = decode(pydicom_file("MR_small.dcm"))
    data = pydicom_file(name)
    syntax = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID
    image = decode(data)
    np.testing.assert_array_equal(image.pixels, reference.pixels, err_msg=f"{name} ({syntax.name})")


@pytest.mark.parametrize(("name", "syntax", "shape"), [
    ("SC_rgb_jpeg_dcmtk.dcm", "1.2.840.10008.1.2.4.50", (100, 100, 3)),  # JPEG baseline, YBR
    ("JPGExtended.dcm", "1.2.840.10008.1.2.4.51", (1024, 256)),  # JPEG extended, 12 bit
    ("JPEGLSNearLossless_16.dcm", "1.2.840.10008.1.2.4.81", None),
    ("JPEG2000.dcm", "1.2.840.10008.1.2.4.91", (1024, 256)),
    ("SC_rgb_rle.dcm", "1.2.840.10008.1.2.5", (100, 100, 3)),
    ("SC_rgb_rle_16bit.dcm", "1.2.840.10008.1.2.5", (100, 100, 3)),
    ("image_dfl.dcm", "1.2.840.10008.1.2.1.99", None),  # deflated
])
def test_every_transfer_syntax_a_pacs_sends_decodes(name, syntax, shape):
    data = pydicom_file(name)
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == syntax
    image = decode(data)
    assert image.pixels.shape == (shape or (int(ds.Rows), int(ds.Columns)))
    assert image.pixels.dtype == np.float32 and 0 <= image.pixels.min() < image.pixels.max() <= 1


def test_rgb_rle_and_jpeg_decode_the_same_picture():
    rle = decode(pydicom_file("SC_rgb_rle.dcm")).pixels
    np.testing.assert_array_equal(decode(pydicom_file("SC_rgb_rle_16bit.dcm")).pixels, rle)
    assert np.abs(decode(pydicom_file("SC_rgb_jpeg_dcmtk.dcm")).pixels - rle).mean() < 0.02  # lossy


def _lossless_dicom(syntax: str, array: np.ndarray, photometric: str = "MONOCHROME2") -> bytes:
    ds = synthetic_dicom(array, photometric=photometric)
    ds.compress(syntax, generate_instance_uid=False)
    return dicom_bytes(ds)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90",
                                    "1.2.840.10008.1.2.1.99"])
def test_multiframe_compressed_dicom_selects_the_requested_frame(syntax):
    frames = np.stack([np.full((64, 48), 100 * k, dtype=np.uint16) for k in range(4)])
    frames[:, 0, 0] = 0
    ds = synthetic_dicom(frames)
    if syntax == "1.2.840.10008.1.2.1.99":
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.compress(syntax, generate_instance_uid=False)
    data = dicom_bytes(ds)
    window = Window(center=200.0, width=400.0)
    assert decode(data, window=window).pixels[1, 1] == pytest.approx(0.5)  # frame 2 of 0..3: 200
    assert decode(data, window=window, slice_index=3).pixels[1, 1] == pytest.approx(0.75)


# --------------------------------------------------------------------------- palette colour
def palette_dicom(indices: np.ndarray, lut: np.ndarray, bits: int = 16, first: int = 0) -> Dataset:
    """A PALETTE COLOR data set: ``indices`` through ``lut`` ((N, 3) or, with alpha, (N, 4)
    entries, one 16-bit word each, as DICOM stores them), descriptor ``(N, first, bits)``."""
    ds = canary_dicom(indices)
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for i, colour in enumerate(("Red", "Green", "Blue", "Alpha")[:lut.shape[1]]):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [len(lut) % 65536, first, bits])
        setattr(ds, f"{colour}PaletteColorLookupTableData", lut[:, i].astype("<u2").tobytes())
    return ds


def test_dicom_palette_colour_file_becomes_rgb():
    """pydicom's PALETTE COLOR example (8-bit indices, 256 entries of 16 bits): RGB through the
    LUTs, scaled by 65535; a request window applies to those RGB values."""
    data = pydicom_file("examples_palette.dcm")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.SamplesPerPixel == 1
    assert list(ds.RedPaletteColorLookupTableDescriptor) == [256, 0, 16]
    luts = [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, "<u2") for c in ("Red", "Green", "Blue")]
    rgb = np.stack([lut[ds.pixel_array] for lut in luts], axis=-1)  # written independently of apply_color_lut
    image = decode(data)
    assert image.pixels.shape == (int(ds.Rows), int(ds.Columns), 3) and image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, rgb / 65535.0, atol=1e-6)
    assert len(np.unique(image.pixels.reshape(-1, 3), axis=0)) > 10  # colour, not a grey index image
    windowed = decode(data, window=Window(center=20000.0, width=40000.0))
    np.testing.assert_allclose(windowed.pixels, window01(rgb, 20000.0, 40000.0), atol=1e-6)


def test_dicom_palette_lut_rules_first_mapped_value_clipping_8_bit_entries_and_alpha():
    indices = np.array([[0, 9, 10, 11], [12, 13, 200, 255]], np.uint8)
    lut = np.array([[0, 10, 20, 255], [50, 60, 70, 128], [100, 110, 120, 0], [250, 240, 230, 64]], np.uint16)
    ds = palette_dicom(indices, lut, bits=8, first=10)  # 8-bit entries in 16-bit words, an Alpha LUT
    image = decode(dicom_bytes(ds))
    assert image.pixels.shape == (2, 4, 3)  # alpha dropped
    # below the first mapped value: entry 0; then entry (index - 10); past the end: the last entry
    expected = lut[[[0, 0, 0, 1], [2, 3, 3, 3]], :3] / 255.0
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    grey16 = np.array([[0, 1], [2, 60000]], np.uint16)  # 16-bit indices, 16-bit entries
    lut16 = np.array([[0, 0, 0], [65535, 0, 0], [0, 65535, 32768]], np.uint16)
    image = decode(dicom_bytes(palette_dicom(grey16, lut16)))
    np.testing.assert_allclose(image.pixels, lut16[[[0, 1], [2, 2]]] / 65535.0, atol=1e-6)


def _segmented(ds: Dataset, words: list[int], bits: int = 16) -> Dataset:
    for colour in ("Red", "Green", "Blue"):
        delattr(ds, f"{colour}PaletteColorLookupTableData")
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, bits])
        setattr(ds, f"Segmented{colour}PaletteColorLookupTableData", np.array(words, "<u2").tobytes())
    return ds


def test_dicom_segmented_palette_decodes_and_a_segment_bomb_is_refused(tmp_path):
    indices = np.array([[0, 1, 2, 3, 100, 255]], np.uint8)
    base = palette_dicom(indices, np.zeros((256, 3), np.uint16))
    # discrete 0, 1000; then a linear segment of 254 entries up to 65535 (256 entries in all)
    image = decode(dicom_bytes(_segmented(base, [0, 2, 0, 1000, 1, 254, 65535])))
    expanded = np.concatenate([[0, 1000], np.around(np.linspace(1000 + (65535 - 1000) / 254, 65535, 254))])
    np.testing.assert_allclose(image.pixels[..., 0], expanded[indices] / 65535.0, atol=1e-6)
    # 3 words per linear segment of 65535 entries: 600 bytes would expand to 6.5 million entries
    bomb = palette_dicom(indices, np.zeros((256, 3), np.uint16))
    data = dicom_bytes(_segmented(bomb, [0, 1, 0] + [1, 65535, 7] * 100))
    assert_says(data, InvalidImage, "segmented palette", f"more than {65536} entries")
    got = decode_in_subprocess(tmp_path, data)
    assert got["outcome"] == "InvalidImage" and got["peak"] < 32 * MIB, got
    indirect = palette_dicom(indices, np.zeros((256, 3), np.uint16))
    assert_says(dicom_bytes(_segmented(indirect, [0, 1, 0, 2, 3, 0, 0])), InvalidImage, "indirect")


def test_dicom_palette_errors_say_what_is_missing_or_wrong():
    indices = np.zeros((4, 4), np.uint8)
    lut = np.zeros((256, 3), np.uint16)
    ds = palette_dicom(indices, lut)
    del ds.GreenPaletteColorLookupTableData
    assert_says(dicom_bytes(ds), InvalidImage, "PALETTE COLOR", "Lookup Table Data")
    assert_says(dicom_bytes(palette_dicom(indices, lut, bits=12)), InvalidImage, "12 bits", "expected 8 or 16")
    ds = palette_dicom(indices, lut)
    del ds.RedPaletteColorLookupTableDescriptor
    assert_says(dicom_bytes(ds), InvalidImage, "Red Palette Color Lookup Table Descriptor")
    ds = palette_dicom(indices, lut[:2])
    ds.GreenPaletteColorLookupTableData = lut[:3, 1].astype("<u2").tobytes()  # LUTs of different lengths
    assert_says(dicom_bytes(ds), InvalidImage, "PALETTE COLOR lookup tables are invalid")
    rgb = synthetic_dicom(np.zeros((4, 4, 3), np.uint8), photometric="RGB")
    rgb.PhotometricInterpretation = "PALETTE COLOR"
    assert_says(dicom_bytes(rgb), InvalidImage, "PALETTE COLOR does not fit SamplesPerPixel 3")


# --------------------------------------------------------------------------- decoder messages
def canary_dicom(array: np.ndarray | None = None, **attrs) -> Dataset:
    ds = synthetic_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) if array is None else array)
    ds.PatientName = "CANARY^SECRET"
    ds.PatientID = "PID-CANARY-42"
    ds.StudyDescription = "CANARY STUDY"
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def assert_says(data: bytes, error: type, *fragments: str) -> str:
    with pytest.raises(error) as info:
        decode(data)
    message = info.value.message
    for fragment in fragments:
        assert fragment in message, message
    assert "truncated or corrupt" not in message or "truncated" in fragments, message
    for secret in ("CANARY", "SECRET", "PID-"):
        assert secret not in message, message
    return message


def test_dicom_errors_name_the_bit_depth():
    assert_says(dicom_bytes(canary_dicom(BitsAllocated=12)), InvalidImage, "BitsAllocated 12", "not supported")
    assert_says(dicom_bytes(canary_dicom(BitsStored=20)), InvalidImage, "BitsStored 20")


def test_dicom_errors_name_samples_and_photometric():
    assert_says(dicom_bytes(canary_dicom(SamplesPerPixel=4)), InvalidImage, "SamplesPerPixel 4")
    assert_says(dicom_bytes(canary_dicom(PhotometricInterpretation="RGB")), InvalidImage,
                "PhotometricInterpretation RGB", "SamplesPerPixel 1")


def test_dicom_errors_name_an_unsupported_transfer_syntax():
    from pydicom.encaps import encapsulate

    ds = canary_dicom()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    ds.PixelData = encapsulate([b"\x00\x00\x00\x01" * 16])
    assert_says(dicom_bytes(ds), InvalidImage, "transfer syntax MPEG-4 AVC/H.264", "not supported")


def test_dicom_errors_say_there_is_no_pixel_data_or_no_image():
    ds = canary_dicom()
    del ds.PixelData
    assert_says(dicom_bytes(ds), InvalidImage, "no Pixel Data")
    message = assert_says(pydicom_file("rtplan.dcm"), InvalidImage, "holds no image", "RT Plan Storage")
    assert "1.2.840" not in message
    assert_says(pydicom_file("test-SR.dcm"), InvalidImage, "holds no image", "SR")


def test_dicom_errors_say_the_pixel_data_is_short():
    ds = canary_dicom()
    ds.PixelData = ds.PixelData[:1000]
    assert_says(dicom_bytes(ds), InvalidImage, "Pixel Data holds 1000 bytes", "need 8192", "truncated")


def test_dicom_errors_say_which_frame_failed_to_decode():
    frame = _frame_of(_lossless_dicom("1.2.840.10008.1.2.4.90", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)))
    data = encapsulated_dicom(frame[:100], "1.2.840.10008.1.2.4.90", bits=16)  # a JPEG 2000 frame cut short
    message = assert_says(data, InvalidImage, "DICOM frame 0", "JPEG 2000", "could not be decoded", "truncated")
    assert "PatientName" not in message


# --------------------------------------------------------------------------- memory bounds
MEMORY_PROBE = r"""
import json, sys
from pathlib import Path
from service.core.domain import ImageInput, ImageLimits
from service.core.errors import ServiceError
from service.core.imageio import decode_image, estimate_decode_bytes

def hwm():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))

data = Path(sys.argv[1]).read_bytes()
limits = ImageLimits(**json.loads(sys.argv[2]))
warm = Path(sys.argv[3]).read_bytes() if len(sys.argv) > 3 else None
if warm:  # load the decoder plugins first, so that their code is not counted
    decode_image(ImageInput(encoded=warm), limits)
before = hwm()
try:
    estimate = int(estimate_decode_bytes(ImageInput(encoded=data), limits))
except ServiceError:
    estimate = None
try:
    image = decode_image(ImageInput(encoded=data), limits)
    outcome, message = "OK", list(image.pixels.shape)
except ServiceError as exc:
    outcome, message = type(exc).__name__, exc.message
print(json.dumps({"outcome": outcome, "message": message, "peak": hwm() - before, "estimate": estimate}))
"""
REPO = Path(__file__).resolve().parents[2]
MIB = 1 << 20
PEAK_BOUND = 200 * MIB


def decode_in_subprocess(tmp_path: Path, data: bytes, limits: ImageLimits = ImageLimits(),
                         warm: bytes | None = None) -> dict:
    """Decode ``data`` in a fresh interpreter; its outcome and the VmHWM growth during the call."""
    import subprocess
    import sys

    path = tmp_path / f"input-{len(list(tmp_path.iterdir()))}.bin"
    path.write_bytes(data)
    argv = [sys.executable, "-c", MEMORY_PROBE, str(path),
            json.dumps({"max_side": limits.max_side, "max_pixels": limits.max_pixels,
                        "max_encoded_bytes": limits.max_encoded_bytes})]
    if warm is not None:
        (tmp_path / "warm.bin").write_bytes(warm)
        argv.append(str(tmp_path / "warm.bin"))
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def jpeg_with_sof(width: int, height: int, components: int | None = None, size: int = 64) -> bytes:
    """A real 8-bit grey JPEG whose SOF marker is rewritten to declare ``width`` x ``height``."""
    data = bytearray(png_bytes(np.full((size, size), 120, np.uint8), format="JPEG"))
    sof = data.find(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    if components is not None:
        data[sof + 9] = components
    return bytes(data)


def encapsulated_dicom(frame: bytes, syntax: str, rows: int = 64, columns: int = 64, bits: int = 8) -> bytes:
    """A grey DICOM of ``rows`` x ``columns`` at ``bits`` whose one frame is ``frame``."""
    from pydicom.encaps import encapsulate

    ds = canary_dicom(np.zeros((rows, columns), np.uint8 if bits == 8 else np.uint16))
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return dicom_bytes(ds)


def test_dicom_jpeg_frame_declaring_60000_squared_is_refused_before_decoding(tmp_path):
    frame = jpeg_with_sof(60000, 60000)
    data = encapsulated_dicom(frame, "1.2.840.10008.1.2.4.50")
    assert len(data) < 1024 + len(frame) and len(frame) < 1024  # well under 1 KB of JPEG in
    warm = encapsulated_dicom(jpeg_with_sof(64, 64), "1.2.840.10008.1.2.4.50")
    got = decode_in_subprocess(tmp_path, data, warm=warm)
    assert got["outcome"] == "InvalidImage", got
    assert "60000x60000" in got["message"] and "64x64" in got["message"] and "larger than" in got["message"]
    assert got["peak"] < PEAK_BOUND, got
    ok = decode_in_subprocess(tmp_path, warm, warm=warm)  # the same file with the true SOF decodes
    assert ok["outcome"] == "OK", ok


@pytest.mark.parametrize("case", ["width", "components", "precision"])
def test_dicom_jpeg_frame_larger_than_declared_in_any_dimension_is_refused(case):
    frame = bytearray(jpeg_with_sof(64, 64))
    sof = frame.find(b"\xff\xc0")
    if case == "width":
        frame[sof + 7:sof + 9] = struct.pack(">H", 65)
    elif case == "components":
        frame[sof + 9] = 3
    else:
        frame[sof + 4] = 12
    with pytest.raises(InvalidImage, match="larger than the data set declares"):
        decode(encapsulated_dicom(bytes(frame), "1.2.840.10008.1.2.4.50"))


def _frame_of(data: bytes) -> bytes:
    from pydicom.encaps import get_frame

    return get_frame(pydicom.dcmread(io.BytesIO(data)).PixelData, 0, number_of_frames=1)


def test_dicom_jpeg_ls_and_jpeg_2000_frames_larger_than_declared_are_refused(tmp_path):
    small = np.full((64, 64), 100, np.uint8)
    jls = bytearray(_frame_of(_lossless_dicom("1.2.840.10008.1.2.4.80", small)))
    sof55 = jls.find(b"\xff\xf7")
    jls[sof55 + 5:sof55 + 9] = struct.pack(">HH", 60000, 60000)
    j2k = bytearray(_frame_of(_lossless_dicom("1.2.840.10008.1.2.4.90", small)))
    siz = j2k.find(b"\xff\x4f\xff\x51")
    j2k[siz + 8:siz + 16] = struct.pack(">II", 60000, 60000)
    for frame, syntax in ((jls, "1.2.840.10008.1.2.4.80"), (j2k, "1.2.840.10008.1.2.4.90")):
        got = decode_in_subprocess(tmp_path, encapsulated_dicom(bytes(frame), syntax))
        assert got["outcome"] == "InvalidImage" and "60000x60000" in got["message"], got
        assert got["peak"] < PEAK_BOUND, got


def test_jpeg_ls_oversize_dimensions_segment_is_read_too():
    jls = bytearray(_frame_of(_lossless_dicom("1.2.840.10008.1.2.4.80", np.full((64, 64), 100, np.uint8))))
    sof55 = jls.find(b"\xff\xf7")
    jls[sof55 + 5:sof55 + 9] = b"\x00\x00\x00\x00"  # X, Y = 0: defined by an LSE (ID 4) segment
    end = sof55 + 2 + struct.unpack(">H", jls[sof55 + 2:sof55 + 4])[0]
    lse = b"\xff\xf8" + struct.pack(">HBB", 12, 4, 4) + struct.pack(">II", 60000, 60000)
    frame = bytes(jls[:end]) + lse + bytes(jls[end:])
    with pytest.raises(InvalidImage, match="60000x60000"):
        decode(encapsulated_dicom(frame, "1.2.840.10008.1.2.4.80"))


def test_jpeg_2000_with_too_many_tiles_is_refused():
    from service.core.imageio import MAX_J2K_TILES

    j2k = bytearray(_frame_of(_lossless_dicom("1.2.840.10008.1.2.4.90", np.full((256, 256), 100, np.uint8))))
    siz = j2k.find(b"\xff\x4f\xff\x51")
    j2k[siz + 24:siz + 32] = struct.pack(">II", 2, 2)  # 2x2 tiles: 16384 of them
    assert 128 * 128 > MAX_J2K_TILES
    with pytest.raises(PayloadTooLarge, match="16384 tiles"):
        decode(encapsulated_dicom(bytes(j2k), "1.2.840.10008.1.2.4.90", 256, 256))


def test_rle_frames_are_bounded_by_rows_and_columns(tmp_path):
    # One segment declared for a 64x64 8-bit frame, whose runs decode to 256 MiB
    # (pydicom's own RLE decoder would grow a bytearray that far).
    runs = b"\x81\x00" * (2 << 20)
    header = struct.pack("<16I", 1, 64, *[0] * 14)
    got = decode_in_subprocess(tmp_path, encapsulated_dicom(header + runs, "1.2.840.10008.1.2.5"),
                               ImageLimits(max_encoded_bytes=8 << 20))
    assert got["outcome"] in ("OK", "InvalidImage"), got
    assert got["peak"] < PEAK_BOUND, got
    with pytest.raises(InvalidImage, match="RLE header declares 3 segment"):
        decode(encapsulated_dicom(struct.pack("<16I", 3, 64, 64, 64, *[0] * 12) + b"\x00" * 64,
                                  "1.2.840.10008.1.2.5"))


def deflated_dicom_bomb(zeros_mib: int, where: str) -> bytes:
    """A deflated DICOM declaring 64x64 8-bit pixels with ``zeros_mib`` MiB of zeros in an
    element after (Data Set Trailing Padding) or before (private) its Pixel Data."""
    ds = canary_dicom(np.zeros((64, 64), np.uint8))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    data = dicom_bytes(ds)
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]
    body = zlib.decompress(data[meta_end:], -zlib.MAX_WBITS)
    element = struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, zeros_mib << 20)
    at = body.rfind(b"\xe0\x7f\x10\x00")
    if where == "before":
        element = struct.pack("<HH2sHI", 0x7FDF, 0x0010, b"OB", 0, zeros_mib << 20)
        prefix, suffix = body[:at] + element, body[at:]
    else:
        prefix, suffix = body + element, b""
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(MIB)
    parts = [deflater.compress(prefix)] + [deflater.compress(chunk) for _ in range(zeros_mib)]
    return data[:meta_end] + b"".join(parts) + deflater.compress(suffix) + deflater.flush()


@pytest.mark.parametrize("where", ["after", "before"])
def test_deflated_dicom_bomb_is_refused_with_bounded_inflation(tmp_path, where):
    data = deflated_dicom_bomb(256, where)
    assert len(data) < 300 * 1024  # 256 MiB of zeros deflate to about 250 KiB; pydicom inflated it all
    got = decode_in_subprocess(tmp_path, data)
    assert got["outcome"] == "PayloadTooLarge", got
    assert ("more than its pixel attributes declare" if where == "after" else "before its Pixel Data") in got["message"]
    assert got["peak"] < PEAK_BOUND, got


def test_deflated_dicom_that_is_not_a_bomb_still_decodes():
    ds = canary_dicom(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    reference = decode(dicom_bytes(ds)).pixels
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    np.testing.assert_array_equal(decode(dicom_bytes(ds)).pixels, reference)
    np.testing.assert_array_equal(decode(deflated_dicom_bomb(0, "after")).pixels, decode(
        dicom_bytes(canary_dicom(np.zeros((64, 64), np.uint8)))).pixels)


def tiff_with_tags(**values: int) -> bytes:
    """A 16x16 uint8 TIFF whose first-IFD values are overwritten in place."""
    data = bytearray(tiff_bytes(np.zeros((16, 16), np.uint8), tile=(16, 16)) if "TileWidth" in values
                     else tiff_bytes(np.zeros((16, 16), np.uint8)))
    with tifffile.TiffFile(io.BytesIO(bytes(data))) as tif:
        tags = tif.pages.first.tags
        for name, value in values.items():
            tag = tags[name]
            size = 2 if tag.dtype == 3 else 4
            data[tag.valueoffset:tag.valueoffset + size] = value.to_bytes(size, "little")
    return bytes(data)


@pytest.mark.parametrize(("tags", "error", "message"), [
    ({"SamplesPerPixel": 65535}, InvalidImage, "65535 samples per pixel"),
    ({"BitsPerSample": 128}, InvalidImage, "BitsPerSample 128"),
    ({"TileWidth": 65520, "TileLength": 65520}, PayloadTooLarge, "tiles of 65520x65520"),
    ({"ImageWidth": 60000, "ImageLength": 60000}, PayloadTooLarge, "60000x60000"),
])
def test_tiff_tags_declaring_a_huge_page_are_refused_before_allocating(tmp_path, tags, error, message):
    data = tiff_with_tags(**tags)
    with pytest.raises(error, match=message):
        decode(data)
    got = decode_in_subprocess(tmp_path, data)
    assert got["outcome"] == error.__name__ and got["peak"] < PEAK_BOUND, got


def test_tiff_volume_pages_are_refused():
    volume = tiff_bytes(np.zeros((4, 16, 16), np.uint8), volumetric=True, tile=(16, 16), photometric="minisblack")
    with pytest.raises(InvalidImage, match="ImageDepth of 4"):
        decode(volume)


def tiff_strip_bomb(compression: int, strip: bytes, side: int = 1024) -> bytes:
    """A ``side`` x ``side`` uint8 TIFF with one strip (declared: side*side bytes) of ``strip``."""
    entries = [(256, 3, side), (257, 3, side), (258, 3, 8), (259, 3, compression), (262, 3, 1), (273, 4, 0),
               (277, 3, 1), (278, 3, side), (279, 4, len(strip))]
    offset = 8 + 2 + 12 * len(entries) + 4
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", code, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else
                                              struct.pack("<I", offset if code == 273 else value))
        for code, kind, value in entries)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + strip


def zlib_zeros(mib: int) -> bytes:
    deflater = zlib.compressobj(9)
    return b"".join(deflater.compress(bytes(MIB)) for _ in range(mib)) + deflater.flush()


@pytest.mark.parametrize("codec", ["deflate", "lzma", "packbits"])
def test_tiff_strip_inflating_past_its_size_is_cut_at_the_strip_size(tmp_path, codec):
    import lzma

    if codec == "deflate":
        data = tiff_strip_bomb(8, zlib_zeros(512))  # 512 MiB of zeros in about 512 KiB
    elif codec == "lzma":
        data = tiff_strip_bomb(34925, lzma.compress(bytes(256 * MIB), preset=1))
    else:
        data = tiff_strip_bomb(32773, b"\x81\x00" * (1 << 20))  # 128 MiB out of 2 MiB
    got = decode_in_subprocess(tmp_path, data)
    assert got["outcome"] == "OK" and got["message"] == [1024, 1024], got  # the declared 1 MiB strip
    assert got["peak"] < PEAK_BOUND, got


def test_tiff_bounded_codecs_decode_what_tifffile_writes():
    grey = (np.arange(40 * 30, dtype=np.uint16) * 37).reshape(40, 30)
    expected = percentile01(grey).astype(np.float32)
    for kwargs in ({"compression": "zlib"}, {"compression": "zlib", "predictor": True}, {"compression": "lzma"},
                   {"compression": "zlib", "tile": (16, 16)}):
        np.testing.assert_array_equal(decode(tiff_bytes(grey, **kwargs)).pixels, expected, err_msg=str(kwargs))
    packbits = png_bytes(grey.astype(np.uint8), format="TIFF", compression="packbits")  # tifffile cannot write it
    assert tifffile.TiffFile(io.BytesIO(packbits)).pages.first.compression == 32773
    np.testing.assert_array_equal(decode(packbits).pixels, percentile01(grey.astype(np.uint8)).astype(np.float32))


def test_png_text_chunk_bomb_stays_bounded(tmp_path):
    body = b"Comment\x00\x00" + zlib.compress(bytes(MIB), 9)
    chunk = struct.pack(">I", len(body)) + b"zTXt" + body + struct.pack(">I", zlib.crc32(b"zTXt" + body))
    png = png_bytes(np.zeros((8, 8), np.uint8))
    data = png[:33] + chunk * 200 + png[33:]  # 200 MiB of text in about 200 KiB
    got = decode_in_subprocess(tmp_path, data)
    assert got["outcome"] in ("OK", "InvalidImage"), got
    assert got["peak"] < PEAK_BOUND, got


def test_jpeg_with_too_many_scans_is_refused():
    from service.core.imageio import MAX_JPEG_SCANS

    data = png_bytes(np.random.default_rng(RNG_SEED).integers(0, 256, (32, 32), dtype=np.uint8), format="JPEG",
                     progressive=True)
    assert decode(data).pixels.shape == (32, 32)
    sos = data.rfind(b"\xff\xda")
    eoi = data.rfind(b"\xff\xd9")
    many = data[:sos] + data[sos:eoi] * (MAX_JPEG_SCANS + 1) + b"\xff\xd9"
    with pytest.raises(PayloadTooLarge, match=f"more than {MAX_JPEG_SCANS} scans"):
        decode(many)
    with pytest.raises(PayloadTooLarge, match="scans"):
        decode(encapsulated_dicom(many, "1.2.840.10008.1.2.4.50", 32, 32))


def test_jpeg_with_a_dnl_defined_height_is_refused():
    with pytest.raises(InvalidImage, match="DNL"):
        decode(encapsulated_dicom(jpeg_with_sof(64, 0), "1.2.840.10008.1.2.4.50"))


# --------------------------------------------------------------------------- the estimate
ESTIMATE_CASES = ["png16", "jpeg_rgb", "tiff_float_zlib", "tiff_rgb_lzw", "dicom_ct", "dicom_j2k", "dicom_rle_rgb",
                  "dicom_deflated", "dicom_palette", "nifti_gz"]


def estimate_case(name: str) -> tuple[bytes, bytes | None]:
    """(file, a small file of the same kind to load its decoder plugins first)."""
    rng = np.random.default_rng(RNG_SEED)
    grey16 = (rng.normal(1000, 300, (1024, 1536)).clip(0, 4000)).astype(np.uint16)
    rgb = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)
    if name == "png16":
        return png_bytes(grey16), None
    if name == "jpeg_rgb":
        return png_bytes(rgb, format="JPEG", quality=90), None
    if name == "tiff_float_zlib":
        return tiff_bytes(grey16.astype(np.float32), compression="zlib"), None
    if name == "tiff_rgb_lzw":
        return png_bytes(rgb, format="TIFF", compression="tiff_lzw"), None
    if name == "dicom_ct":
        return dicom_bytes(synthetic_dicom(grey16.astype(np.int16), modality="CT")), None
    if name == "dicom_j2k":
        return (_lossless_dicom("1.2.840.10008.1.2.4.90", grey16),
                _lossless_dicom("1.2.840.10008.1.2.4.90", grey16[:64, :64].copy()))
    if name == "dicom_rle_rgb":
        return _lossless_dicom("1.2.840.10008.1.2.5", rgb, "RGB"), _lossless_dicom(
            "1.2.840.10008.1.2.5", rgb[:8, :8].copy(), "RGB")
    if name == "dicom_deflated":
        ds = synthetic_dicom(grey16)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
        return dicom_bytes(ds), None
    if name == "dicom_palette":  # 8-bit indices through 16-bit LUTs
        lut = rng.integers(0, 65536, (256, 3)).astype(np.uint16)
        return dicom_bytes(palette_dicom((grey16 // 16).astype(np.uint8), lut)), None
    assert name == "nifti_gz"
    return nifti_bytes(rng.normal(0, 1, (256, 256, 20)).astype(np.float32), compress=True), None


@pytest.mark.parametrize("name", ESTIMATE_CASES)
def test_estimate_decode_bytes_bounds_the_measured_peak(tmp_path, name):
    """The header-only estimate is at least the decoder's measured peak (VmHWM growth), and
    not wildly above it (admission charges it)."""
    data, warm = estimate_case(name)
    got = decode_in_subprocess(tmp_path, data, warm=warm)
    assert got["outcome"] == "OK", got
    assert got["estimate"] >= got["peak"], got
    assert got["estimate"] < 4 * got["peak"] + 32 * MIB, got


def test_estimate_decode_bytes_is_an_int_with_the_image_size():
    from service.core.imageio import estimate_decode_bytes

    data = dicom_bytes(synthetic_dicom(np.zeros((30, 40), np.uint16)))
    estimate = estimate_decode_bytes(ImageInput(encoded=data))
    assert isinstance(estimate, int) and (estimate.height, estimate.width) == (30, 40)
    assert estimate > 30 * 40 * 2
    raw = estimate_decode_bytes(ImageInput(raw=RawPixels("uint8", (10, 20, 3), b"\x00" * 600)))
    assert (raw.height, raw.width) == (10, 20) and raw >= 600
    with pytest.raises(PayloadTooLarge):
        estimate_decode_bytes(ImageInput(encoded=png_header_only(100_000, 100_000)))
    with pytest.raises(PayloadTooLarge):
        estimate_decode_bytes(ImageInput(encoded=deflated_dicom_bomb(0, "after")), ImageLimits(max_side=32))
    with pytest.raises(InvalidImage):
        estimate_decode_bytes(ImageInput(encoded=b"not an image at all" * 20))


def test_planar_rgb_tiff_of_any_dtype_gives_c_contiguous_pixels():
    rgb = np.random.default_rng(RNG_SEED).normal(100, 30, (3, 12, 9)).astype(np.float32)
    image = decode(tiff_bytes(rgb, planarconfig="separate", photometric="rgb"))
    assert image.pixels.shape == (12, 9, 3) and image.pixels.flags.c_contiguous
    np.testing.assert_allclose(image.pixels, percentile01(np.moveaxis(rgb, 0, -1)), atol=1e-6)
