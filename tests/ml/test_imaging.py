"""Tests for ml.imaging: real radiographs, crafted hostile inputs, and DICOM built with pydicom."""

from __future__ import annotations

import ast
import csv
import inspect
import io
import json
import random
import struct
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageFile
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from ml.imaging import (
    DecodedImage,
    ImageError,
    Limits,
    decode_image,
    sniff_media_type,
    to_display_png,
)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
# Real radiographs copied from CC BY sources; see tests/fixtures/LICENSE.md.
FIXTURE_PNGS = [
    FIXTURES / name
    for name in ("hannover__3a81faf3.png", "hannover__0957ce54.png", "cxnet__681.png")
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ERROR_CODES = {
    "empty_file",
    "unsupported_format",
    "too_large_bytes",
    "too_many_pixels",
    "bad_dimensions",
    "corrupt_image",
    "multi_frame",
    "dicom_no_pixel_data",
    "dicom_unsupported",
}


def _shared_cxr_dir() -> Path | None:
    """The shared data set lives beside the clone (CI) or inside it (device checkouts)."""
    for candidate in (REPO.parent / "shared" / "data" / "cxr", REPO / "shared" / "data" / "cxr"):
        if (candidate / "manifest.csv").is_file():
            return candidate
    return None


def _real_sample(per_source: int = 5) -> list[Path]:
    """A deterministic sample spread evenly over every source in the manifest."""
    root = _shared_cxr_dir()
    if root is None:
        return []
    by_source: dict[str, list[str]] = {}
    with open(root / "manifest.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_source.setdefault(row["source"], []).append(row["file"])
    sample = []
    for files in by_source.values():
        files.sort()
        step = max(1, len(files) // per_source)
        sample += [root / name for name in files[::step][:per_source]]
    return sample


REAL_SAMPLE = _real_sample()


# --- builders for crafted inputs ------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _ramp(width: int, height: int) -> np.ndarray:
    """An 8-bit diagonal gradient: smooth, non-constant, survives JPEG well."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x + y) * 255 // (width + height - 2)).astype(np.uint8)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, with a few bytes of pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        PNG_SIGNATURE
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **elements: object,
) -> Dataset:
    """A minimal Secondary Capture dataset holding `pixels` uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def _dicom_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _encapsulated(ds: Dataset, frame: bytes, syntax: pydicom.uid.UID) -> bytes:
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _dicom_bytes(ds)


def _ramp12() -> np.ndarray:
    """64x64 12-bit values covering 0..4095 exactly once."""
    return np.arange(4096, dtype=np.uint16).reshape(64, 64)


def _code(data: bytes, limits: Limits | None = None) -> str:
    """The error code decode_image raises for `data`, checking the error's shape on the way."""
    with pytest.raises(ImageError) as caught:
        decode_image(data, limits or Limits())
    assert caught.value.code in ERROR_CODES
    assert str(caught.value) == caught.value.message
    return caught.value.code


@pytest.fixture
def xray_png() -> bytes:
    return FIXTURE_PNGS[0].read_bytes()


# --- interface and sniffing ----------------------------------------------------------------


def test_decode_image_takes_bytes_and_limits_only() -> None:
    assert list(inspect.signature(decode_image).parameters) == ["data", "limits"]
    err = ImageError("corrupt_image", "broken")
    assert isinstance(err, ValueError)
    assert (err.code, err.message, str(err)) == ("corrupt_image", "broken", "broken")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG_SIGNATURE + b"\x00\x00\x00\rIHDR", "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "image/jpeg"),
        (b"\x00" * 128 + b"DICM" + b"\x02\x00", "application/dicom"),
        (b"DICM" + b"\x00" * 200, None),  # "DICM" must sit after the 128-byte preamble
        (b"GIF89a\x01\x00\x01\x00", None),
        (b"%PDF-1.4\n", None),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", None),
        (b"hello", None),
        (b"\x89PN", None),
        (b"", None),
    ],
)
def test_sniff_media_type_uses_content(data: bytes, expected: str | None) -> None:
    assert sniff_media_type(data) == expected


def test_ml_imaging_is_framework_free() -> None:
    source = (REPO / "ml" / "imaging.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - sys.stdlib_module_names <= {"numpy", "PIL", "pydicom"}


# --- real radiographs ----------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURE_PNGS, ids=lambda p: p.name)
def test_fixture_xrays_decode_exactly(path: Path) -> None:
    image = decode_image(path.read_bytes())
    with Image.open(path) as pil:
        expected = np.asarray(pil.convert("L"), dtype=np.float32) / 255
        assert (image.width, image.height) == pil.size
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == (image.height, image.width)
    np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-7)
    assert image.pixels.std() > 0.05
    assert (image.media_type, image.bit_depth) == ("image/png", 8)


def test_fixtures_are_three_small_documented_cc_by_images() -> None:
    notes = (FIXTURES / "LICENSE.md").read_text()
    for path in FIXTURE_PNGS:
        assert path.stat().st_size < 100_000
        line = next(line for line in notes.splitlines() if f"`{path.name}`" in line)
        assert "CC BY" in line and "DOI 10." in line and f"images/covid/{path.name}" in line


@pytest.mark.skipif(not REAL_SAMPLE, reason="shared/data/cxr is not available")
def test_real_xrays_across_sources_decode() -> None:
    sources = {path.name.split("__")[0] for path in REAL_SAMPLE}
    assert len(REAL_SAMPLE) >= 25 and len(sources) >= 5
    for path in REAL_SAMPLE:
        image = decode_image(path.read_bytes())
        with Image.open(path) as pil:
            assert (image.width, image.height) == pil.size, path
            expected = np.asarray(pil.convert("L"), dtype=np.float32) / 255
        assert image.pixels.dtype == np.float32 and image.pixels.shape == expected.shape, path
        assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0, path
        np.testing.assert_allclose(image.pixels, expected, rtol=0, atol=1e-7, err_msg=str(path))


# --- refused inputs ------------------------------------------------------------------------


def test_empty_file() -> None:
    assert _code(b"") == "empty_file"


def test_byte_limit_is_checked_first_and_is_inclusive(xray_png: bytes) -> None:
    assert _code(xray_png, Limits(max_bytes=len(xray_png) - 1)) == "too_large_bytes"
    assert _code(b"hello" * 10, Limits(max_bytes=10)) == "too_large_bytes"
    assert decode_image(xray_png, Limits(max_bytes=len(xray_png))).width > 0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"hello", "not a PNG, JPEG or DICOM"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer\n%%EOF\n", "PDF documents"),
        (
            _encode(
                Image.new("L", (40, 40), 10),
                "GIF",
                save_all=True,
                append_images=[Image.new("L", (40, 40), 200)],
            ),
            "GIF images",
        ),
        (_encode(Image.new("L", (40, 40)), "TIFF"), "TIFF images"),
        (_encode(Image.new("L", (40, 40)), "BMP"), "BMP images"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 24, "WebP images"),
    ],
    ids=["text", "pdf", "animated-gif", "tiff", "bmp", "webp"],
)
def test_unsupported_formats_name_what_was_sent(data: bytes, fragment: str) -> None:
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert caught.value.code == "unsupported_format"
    assert fragment in caught.value.message
    assert "PNG, JPEG or DICOM" in caught.value.message


def test_truncated_png_is_corrupt_and_truncation_stays_strict(xray_png: bytes) -> None:
    assert _code(xray_png[: len(xray_png) // 2]) == "corrupt_image"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_jpeg_is_corrupt() -> None:
    jpeg = _encode(Image.fromarray(_ramp(200, 150)), "JPEG", quality=90)
    assert _code(jpeg[: len(jpeg) // 2]) == "corrupt_image"


@pytest.mark.parametrize("payload", [b"", b"garbage" * 20, b"\x00\x00\x00\rIHDR" + b"\xff" * 40])
def test_png_signature_followed_by_junk_is_corrupt(payload: bytes) -> None:
    assert _code(PNG_SIGNATURE + payload) == "corrupt_image"


@pytest.mark.parametrize("pillow_guard", [True, False], ids=["pillow-guard", "own-check-only"])
def test_decompression_bomb_is_refused_from_the_header(
    pillow_guard: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not pillow_guard:
        # Our own header check must hold even where Pillow's global guard is disabled.
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    bomb = _bomb_png(100_000, 100_000)
    assert len(bomb) < 200
    started = time.perf_counter()
    assert _code(bomb) == "too_many_pixels"
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_enforced_below_pillows_guard(xray_png: bytes) -> None:
    # 81 Mpx is under Pillow's bomb threshold (~89 Mpx) but over our 60 Mpx.
    assert _code(_bomb_png(9_000, 9_000)) == "too_many_pixels"
    assert _code(xray_png, Limits(max_pixels=1_000)) == "too_many_pixels"


def test_side_limits() -> None:
    assert _code(_encode(Image.new("L", (10, 10), 128), "PNG")) == "bad_dimensions"
    assert _code(_encode(Image.new("L", (200, 40), 128), "PNG"), Limits(max_side=100)) == (
        "bad_dimensions"
    )
    assert decode_image(_encode(Image.new("L", (32, 32), 128), "PNG")).width == 32


def test_animated_png_is_multi_frame() -> None:
    frames = [Image.fromarray(_ramp(64, 64) // (i + 1)) for i in range(3)]
    apng = _encode(frames[0], "PNG", save_all=True, append_images=frames[1:])
    assert apng.startswith(PNG_SIGNATURE)
    assert _code(apng) == "multi_frame"


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on damaged headers
def test_fuzzed_inputs_only_ever_raise_image_error(xray_png: bytes) -> None:
    small = Image.fromarray(_ramp(48, 40))
    dicom = _dicom_bytes(_dicom((_ramp(48, 40).astype(np.uint16) * 16), bits_stored=12))
    seeds = [xray_png, _encode(small, "JPEG", quality=80), dicom]
    rng = random.Random(1234)
    outcomes: dict[str, int] = {}
    for seed in seeds:
        for _ in range(120):
            data = bytearray(seed)
            for _ in range(rng.randint(1, 8)):
                pos = rng.randrange(len(data))
                data[pos] = rng.randrange(256)
            if rng.random() < 0.3:
                del data[rng.randrange(len(data)) :]
            try:
                image = decode_image(bytes(data))
            except ImageError as err:
                outcomes[err.code] = outcomes.get(err.code, 0) + 1
            else:
                assert isinstance(image, DecodedImage)
                assert image.pixels.dtype == np.float32
                assert np.isfinite(image.pixels).all()
                assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
                outcomes["ok"] = outcomes.get("ok", 0) + 1
    assert set(outcomes) - {"ok"} <= ERROR_CODES
    assert outcomes.get("corrupt_image", 0) > 0 and outcomes.get("ok", 0) > 0


# --- PNG and JPEG modes --------------------------------------------------------------------


def test_16_bit_png_keeps_full_precision() -> None:
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    png = _encode(Image.fromarray(ramp), "PNG")
    image = decode_image(png)
    assert image.bit_depth == 16
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, ramp / 65535.0, rtol=0, atol=1e-7)
    assert len(np.unique(image.pixels)) == 65536
    flat = image.pixels.ravel()
    assert flat[1000] < flat[1001]
    assert (flat[0], flat[-1]) == (0.0, 1.0)


def test_one_bit_png() -> None:
    arr = np.zeros((40, 40), dtype=bool)
    arr[:, 20:] = True
    image = decode_image(_encode(Image.fromarray(arr), "PNG"))
    assert image.bit_depth == 1
    np.testing.assert_array_equal(image.pixels, arr.astype(np.float32))


def test_palette_png_uses_palette_luminance() -> None:
    rgb = np.stack([_ramp(64, 48), _ramp(64, 48)[::-1], np.full((48, 64), 90, np.uint8)], -1)
    pal = Image.fromarray(rgb).quantize(colors=32)
    pal.info["transparency"] = 0
    expected = np.asarray(pal.convert("RGB").convert("L"), dtype=np.float32) / 255
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode_image(_encode(pal, "PNG", transparency=0))
    assert image.attributes["mode"] == "P"
    np.testing.assert_allclose(image.pixels, expected, atol=1e-7)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_dropped_not_composited(mode: str) -> None:
    gray = _ramp(64, 48)
    alpha = np.zeros_like(gray)  # fully transparent: compositing would give a black image
    channels = [gray, gray, gray, alpha] if mode == "RGBA" else [gray, alpha]
    img = Image.fromarray(np.stack(channels, -1))
    assert img.mode == mode
    image = decode_image(_encode(img, "PNG"))
    np.testing.assert_allclose(image.pixels, gray / np.float32(255), atol=1e-7)


def test_rgb_png_becomes_luma() -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)
    rgb[:, 20:] = (0, 255, 0)
    image = decode_image(_encode(Image.fromarray(rgb), "PNG"))
    assert image.pixels.ndim == 2
    assert image.pixels[0, 0] == pytest.approx(0.299, abs=0.005)
    assert image.pixels[0, -1] == pytest.approx(0.587, abs=0.005)


def test_cmyk_jpeg_is_not_inverted() -> None:
    gray = _ramp(96, 64)
    cmyk = Image.fromarray(gray).convert("RGB").convert("CMYK")
    image = decode_image(_encode(cmyk, "JPEG", quality=95))
    assert image.attributes["mode"] == "CMYK"
    assert image.media_type == "image/jpeg"
    expected = gray / 255.0
    assert np.abs(image.pixels - expected).mean() < 0.03
    assert np.corrcoef(image.pixels.ravel(), expected.ravel())[0, 1] > 0.99


def test_exif_orientation_is_applied() -> None:
    stored = np.zeros((40, 64), np.uint8)  # 64 wide, 40 tall as stored
    stored[:16, :16] = 255  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    image = decode_image(_encode(Image.fromarray(stored), "JPEG", exif=exif, quality=95))
    assert (image.width, image.height) == (40, 64)
    assert image.pixels.shape == (64, 40)
    assert image.attributes["exif_orientation"] == 6
    assert image.pixels[:16, -16:].mean() > 0.8  # the marker is now top-right
    assert image.pixels[:16, :16].mean() < 0.2


# --- DICOM ---------------------------------------------------------------------------------


def test_dicom_12_bit_monochrome2() -> None:
    image = decode_image(_dicom_bytes(_dicom(_ramp12(), bits_stored=12)))
    assert (image.media_type, image.bit_depth, image.width, image.height) == (
        "application/dicom",
        12,
        64,
        64,
    )
    assert image.pixels.dtype == np.float32
    np.testing.assert_allclose(image.pixels, _ramp12() / 4095.0, atol=1e-6)
    assert image.attributes["BitsStored"] == 12
    assert image.attributes["PhotometricInterpretation"] == "MONOCHROME2"
    assert image.attributes["TransferSyntaxUID"] == ExplicitVRLittleEndian


def test_dicom_rescale_is_applied_before_the_window() -> None:
    # Stored 0..4095 with intercept -1024: stored 1024 is 0 HU, the window centre.
    ds = _dicom(
        _ramp12(),
        bits_stored=12,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=0,
        WindowWidth=400,
    )
    image = decode_image(_dicom_bytes(ds))
    flat = image.pixels.ravel()
    assert flat[:800].max() == 0.0
    assert flat[1250:].min() == 1.0
    assert flat[1024] == pytest.approx(0.5, abs=0.01)
    assert (image.attributes["WindowCenter"], image.attributes["WindowWidth"]) == (0.0, 400.0)


def test_dicom_negative_slope_survives_normalisation() -> None:
    ds = _dicom(_ramp12(), bits_stored=12, RescaleSlope=-1, RescaleIntercept=0)
    image = decode_image(_dicom_bytes(ds))
    np.testing.assert_allclose(image.pixels, 1.0 - _ramp12() / 4095.0, atol=1e-6)


def test_dicom_first_of_several_windows_is_used() -> None:
    ds = _dicom(_ramp12(), bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[200, 200])
    image = decode_image(_dicom_bytes(ds))
    flat = image.pixels.ravel()
    assert flat[1000] == pytest.approx(0.5, abs=0.01)
    assert flat[3000] == 1.0
    assert image.attributes["WindowCenter"] == 1000.0


def test_dicom_monochrome1_is_inverted_to_bright_bone() -> None:
    mono2 = decode_image(_dicom_bytes(_dicom(_ramp12(), bits_stored=12)))
    mono1 = decode_image(_dicom_bytes(_dicom(_ramp12(), "MONOCHROME1", bits_stored=12)))
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.attributes["PhotometricInterpretation"] == "MONOCHROME1"


def test_dicom_signed_pixels() -> None:
    signed = (_ramp12().astype(np.int32) - 2048).astype(np.int16)
    image = decode_image(_dicom_bytes(_dicom(signed, bits_stored=12)))
    np.testing.assert_allclose(image.pixels, _ramp12() / 4095.0, atol=1e-6)


def test_constant_dicom_gives_zeros_not_nan() -> None:
    image = decode_image(_dicom_bytes(_dicom(np.full((40, 40), 700, np.uint16))))
    assert np.isfinite(image.pixels).all()
    assert not image.pixels.any()


def test_dicom_rgb_becomes_luma() -> None:
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:, :20] = (200, 0, 0)
    rgb[:, 20:] = (0, 200, 0)
    image = decode_image(_dicom_bytes(_dicom(rgb, "RGB", bits_stored=8)))
    assert image.pixels.shape == (40, 40)
    assert (image.pixels[0, 0], image.pixels[0, -1]) == (0.0, 1.0)  # green has more luma


def test_dicom_without_pixel_data() -> None:
    ds = _dicom(_ramp12())
    del ds.PixelData
    assert _code(_dicom_bytes(ds)) == "dicom_no_pixel_data"


def test_multi_frame_dicom() -> None:
    ds = _dicom(np.concatenate([_ramp12(), _ramp12()]), NumberOfFrames=2)
    ds.Rows = 64
    assert _code(_dicom_bytes(ds)) == "multi_frame"


def test_dicom_dimensions_are_checked_before_decoding() -> None:
    # Claims 60000x60000 but carries 16 bytes: decoding first would report corruption.
    ds = _dicom(np.zeros((2, 4), np.uint16), Rows=60_000, Columns=60_000)
    assert _code(_dicom_bytes(ds)) == "too_many_pixels"
    assert _code(_dicom_bytes(_dicom(np.zeros((10, 10), np.uint16)))) == "bad_dimensions"


def test_dicom_rle_lossless_round_trip() -> None:
    plain = decode_image(_dicom_bytes(_dicom(_ramp12(), bits_stored=12)))
    ds = _dicom(_ramp12(), bits_stored=12)
    ds.compress(RLELossless)
    image = decode_image(_dicom_bytes(ds))
    assert image.attributes["TransferSyntaxUID"] == RLELossless
    np.testing.assert_array_equal(image.pixels, plain.pixels)


def test_dicom_jpeg2000_lossless_round_trip() -> None:
    if not get_encoder(JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 encoder installed")
    plain = decode_image(_dicom_bytes(_dicom(_ramp12(), bits_stored=12)))
    ds = _dicom(_ramp12(), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    image = decode_image(_dicom_bytes(ds))
    assert image.attributes["TransferSyntaxUID"] == JPEG2000Lossless
    np.testing.assert_array_equal(image.pixels, plain.pixels)


def test_dicom_jpeg_baseline() -> None:
    gray = _ramp(96, 64)
    frame = _encode(Image.fromarray(gray), "JPEG", quality=95)
    image = decode_image(_encapsulated(_dicom(gray), frame, JPEGBaseline8Bit))
    assert image.bit_depth == 8
    assert np.abs(image.pixels - gray / 255.0).max() < 0.03


def test_dicom_without_a_decoder_is_unsupported() -> None:
    data = _encapsulated(_dicom(_ramp(64, 64)), b"\x00\x00\x01\xb3" + b"\x00" * 60, MPEG2MPML)
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert caught.value.code == "dicom_unsupported"
    assert "MPEG2" in caught.value.message


def test_garbled_compressed_dicom_is_corrupt() -> None:
    frame = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2
    assert _code(_encapsulated(_dicom(_ramp(64, 64)), frame, JPEGBaseline8Bit)) == "corrupt_image"


def test_dicom_garbage_after_preamble_is_corrupt() -> None:
    assert _code(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4) == "corrupt_image"


def test_dicom_without_preamble_is_not_recognised() -> None:
    assert _code(_dicom_bytes(_dicom(_ramp12()))[132:]) == "unsupported_format"


def test_dicom_attributes_hold_no_identifiers() -> None:
    identifying = {
        "PatientName": "Doe^John",
        "PatientID": "12345",
        "PatientBirthDate": "19700101",
        "AccessionNumber": "ACC998877",
        "InstitutionName": "St Elsewhere Hospital",
        "ReferringPhysicianName": "House^Gregory",
        "StudyDate": "20200401",
        "StudyInstanceUID": generate_uid(),
        "SeriesInstanceUID": generate_uid(),
    }
    ds = _dicom(
        _ramp12(),
        bits_stored=12,
        ViewPosition="PA",
        BodyPartExamined="CHEST",
        Manufacturer="Acme Imaging",
        PixelSpacing=[0.139, 0.14],
        **identifying,
    )
    image = decode_image(_dicom_bytes(ds))
    text = json.dumps(image.attributes)
    for value in [*identifying.values(), "Doe", "John", ds.SOPInstanceUID]:
        assert value not in text
    assert image.attributes["ViewPosition"] == "PA"
    assert image.attributes["BodyPartExamined"] == "CHEST"
    assert image.attributes["Manufacturer"] == "Acme Imaging"
    assert image.attributes["PixelSpacing"] == [0.139, 0.14]
    assert set(image.attributes) <= {
        "Modality",
        "ViewPosition",
        "BodyPartExamined",
        "PhotometricInterpretation",
        "BitsStored",
        "Rows",
        "Columns",
        "Manufacturer",
        "TransferSyntaxUID",
        "PixelSpacing",
        "WindowCenter",
        "WindowWidth",
    }


def test_damaged_dicom_values_reach_neither_logs_nor_attributes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a damaged length field looks like when a safe element swallows its
    # neighbours: pydicom's read validation would quote the value in a log line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = _dicom(_ramp12(), ViewPosition="Doe^John", Manufacturer="Doe^John " * 10)
        data = _dicom_bytes(ds)
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode_image(data)
    assert "Manufacturer" not in image.attributes
    assert not [w for w in caught if "Doe^John" in str(w.message)]
    assert "Doe^John" not in caplog.text


# --- display rendering ---------------------------------------------------------------------


def _open_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_SIGNATURE)
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_display_png_downscales_keeping_aspect() -> None:
    y, x = np.mgrid[0:1500, 0:3000]
    pixels = ((x + y) / (3000 + 1500 - 2)).astype(np.float32)
    image = DecodedImage(pixels, "image/png", 3000, 1500, 16, {})
    shown = _open_png(to_display_png(image))
    assert (shown.format, shown.mode, shown.size) == ("PNG", "L", (1024, 512))
    assert _open_png(to_display_png(image, max_side=100)).size == (100, 50)


def test_display_png_keeps_small_images_exact(xray_png: bytes) -> None:
    image = decode_image(xray_png)
    shown = _open_png(to_display_png(image))
    assert shown.mode == "L"
    assert shown.size == (image.width, image.height)
    np.testing.assert_array_equal(np.asarray(shown), np.rint(image.pixels * 255).astype(np.uint8))
