"""Image intake: uploaded bytes -> validated grayscale pixel array (PNG, JPEG, DICOM).

Everything a user can upload goes through `decode_image`, which either returns a
`DecodedImage` or raises `ImageError` with a stable code and a readable message.
The format is decided by content only; file names never reach this module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps
from pydicom import config as dicom_config
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder

PNG = "image/png"
JPEG = "image/jpeg"
DICOM = "application/dicom"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ACCEPTED = "upload PNG, JPEG or DICOM"
# Pillow modes that hold 16-bit samples (PNG 16-bit grayscale); "I" is how older
# Pillow releases exposed them.
_WIDE_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
# ITU-R BT.601 luma, the same weights Pillow uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114])
# Attributes that describe the acquisition without identifying the patient, the
# institution or the study; anything not listed here is never copied out.
_SAFE_DICOM_KEYWORDS = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
    "Manufacturer",
)

# pydicom's validation warnings quote element values into the log, and a damaged
# length field can make a harmless element swallow the patient's name; the service
# never logs patient identifiers, so value validation on read is switched off.
dicom_config.settings.reading_validation_mode = dicom_config.IGNORE


@dataclass(frozen=True)
class Limits:
    """Upper and lower bounds an upload must respect before any pixels are decoded."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 60_000_000
    max_side: int = 12_000
    min_side: int = 32


DEFAULT_LIMITS = Limits()


class ImageError(ValueError):
    """An upload that cannot be used; `code` is stable, `message` is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    """A grayscale float32 image in [0, 1] where 1.0 is white as a radiologist views it."""

    pixels: np.ndarray
    media_type: str
    width: int
    height: int
    bit_depth: int
    attributes: dict[str, Any] = field(default_factory=dict)


def sniff_media_type(data: bytes) -> str | None:
    """Return the media type recognised from the leading bytes, or None."""
    if data.startswith(_PNG_SIGNATURE):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    # Only Part 10 files (preamble + "DICM"); headerless datasets are too
    # ambiguous to recognise safely from content.
    if len(data) >= 132 and data[128:132] == b"DICM":
        return DICOM
    return None


def decode_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> DecodedImage:
    """Validate and decode an upload; raise ImageError for anything unusable."""
    if len(data) == 0:
        raise ImageError("empty_file", "The file is empty")
    if len(data) > limits.max_bytes:
        raise ImageError(
            "too_large_bytes",
            f"The file is {len(data):,} bytes; the limit is {limits.max_bytes:,} bytes",
        )
    media_type = sniff_media_type(data)
    if media_type is None:
        raise ImageError("unsupported_format", _describe_unsupported(data))
    try:
        if media_type == DICOM:
            return _decode_dicom(data, limits)
        return _decode_raster(data, media_type, limits)
    except ImageError:
        raise
    except MemoryError:
        # Limits are checked before decoding, so running out of memory is a
        # server problem, not a property of the file; let the caller retry.
        raise
    except Exception as exc:  # any decoder failure on hostile bytes is "corrupt"
        raise ImageError(
            "corrupt_image", "The image could not be read; the file may be damaged"
        ) from exc


def to_display_png(image: DecodedImage, max_side: int = 1024) -> bytes:
    """Render an 8-bit grayscale PNG for the browser, downscaled to fit max_side."""
    if max_side < 1:
        raise ValueError("max_side must be positive")
    gray = np.rint(np.clip(image.pixels, 0.0, 1.0) * 255.0).astype(np.uint8)
    im = Image.fromarray(gray)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = BytesIO()
    im.save(out, format="PNG")
    return out.getvalue()


def _describe_unsupported(data: bytes) -> str:
    """Name the format when it is a common mistake, so the user knows what to change."""
    known = {
        b"GIF87a": "GIF images",
        b"GIF89a": "GIF images",
        b"%PDF": "PDF documents",
        b"BM": "BMP images",
        b"II*\x00": "TIFF images",
        b"MM\x00*": "TIFF images",
        b"PK\x03\x04": "ZIP archives",
        b"\x00\x00\x00\x0cjP  ": "JPEG 2000 images",
    }
    for magic, kind in known.items():
        if data.startswith(magic):
            return f"{kind} are not supported; {_ACCEPTED}"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return f"WebP images are not supported; {_ACCEPTED}"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return f"HEIC/AVIF images are not supported; {_ACCEPTED}"
    return f"The file is not a PNG, JPEG or DICOM image; {_ACCEPTED}"


def _check_size(width: int, height: int, limits: Limits) -> None:
    """Refuse dimensions outside the limits; called before any pixel is decoded."""
    if width * height > limits.max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"The image is {width}x{height} ({width * height:,} pixels); "
            f"the limit is {limits.max_pixels:,} pixels",
        )
    if min(width, height) < limits.min_side or max(width, height) > limits.max_side:
        raise ImageError(
            "bad_dimensions",
            f"The image is {width}x{height} pixels; each side must be between "
            f"{limits.min_side} and {limits.max_side} pixels",
        )


def _decode_raster(data: bytes, media_type: str, limits: Limits) -> DecodedImage:
    """Decode PNG or JPEG with Pillow, checking the header before the pixels."""
    try:
        # formats= keeps Pillow from trying any other parser on these bytes.
        im = Image.open(BytesIO(data), formats=["PNG" if media_type == PNG else "JPEG"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (the warning only arrives here if warnings are errors).
        raise ImageError("too_many_pixels", "The image has too many pixels to process") from exc
    width, height = im.size
    _check_size(width, height, limits)
    if getattr(im, "n_frames", 1) > 1:
        raise ImageError("multi_frame", "Animated or multi-frame images are not supported")
    im.load()

    attributes: dict[str, Any] = {"mode": im.mode}
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block should not reject readable pixels
        orientation = 1
    if orientation in range(2, 9):
        im = ImageOps.exif_transpose(im)
        attributes["exif_orientation"] = orientation

    if im.mode in _WIDE_MODES:
        # PNG scales every sample depth to the full 16-bit range, so 65535 is white.
        pixels = np.asarray(im).astype(np.float32) / np.float32(65535.0)
        bit_depth = 16
    else:
        if im.mode not in ("1", "L", "LA", "La", "I", "F"):
            # Measured before the grey conversion drops it: the input gate uses it.
            attributes["colourfulness"] = colourfulness(np.asarray(_rgb_thumbnail(im)))
        pixels = np.asarray(_to_gray8(im)).astype(np.float32) / np.float32(255.0)
        bit_depth = 8
    if media_type == PNG and data[12:16] == b"IHDR" and data[25] != 3:
        # Report the stored depth (1/2/4/8/16); for palettes the index depth is
        # meaningless, the palette entries are 8-bit.
        bit_depth = data[24]
    np.clip(pixels, 0.0, 1.0, out=pixels)
    return DecodedImage(
        pixels=np.ascontiguousarray(pixels),
        media_type=media_type,
        width=pixels.shape[1],
        height=pixels.shape[0],
        bit_depth=int(bit_depth),
        attributes=attributes,
    )


def colourfulness(rgb: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of an (h, w, 3) RGB array, on a 0-1 scale; 0 for grey."""
    rgb = np.asarray(rgb, np.float64)
    if rgb.max(initial=0.0) > 1.0:
        rgb = rgb / 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg, yb = r - g, 0.5 * (r + g) - b
    spread = math.hypot(float(rg.std()), float(yb.std()))
    return round(spread + 0.3 * math.hypot(float(rg.mean()), float(yb.mean())), 4)


def _rgb_thumbnail(im: Image.Image, side: int = 256) -> Image.Image:
    """An RGB copy at most side px, enough for image-wide colour statistics."""
    rgb = im.convert("RGB")
    if max(rgb.size) > side:
        rgb.thumbnail((side, side), Image.Resampling.BOX)
    return rgb


def _to_gray8(im: Image.Image) -> Image.Image:
    """Convert any 8-bit Pillow mode to L, dropping alpha rather than compositing it."""
    # Alpha is dropped, not composited over black or white: a radiograph with an
    # alpha channel is an export artefact, and the stored intensities are the signal.
    if im.mode in ("LA", "La"):
        return im.getchannel("L")
    if im.mode in ("P", "PA"):
        im.info.pop("transparency", None)
    if im.mode not in ("1", "L", "RGB"):
        # CMYK included: Pillow has already undone Adobe's inverted CMYK on decode.
        im = im.convert("RGB")
    return im.convert("L")


def _decode_dicom(data: bytes, limits: Limits) -> DecodedImage:
    """Decode a single-frame DICOM image and apply its modality and VOI transforms."""
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except Exception as exc:
        raise ImageError("corrupt_image", "The DICOM file could not be parsed") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise ImageError("corrupt_image", "The DICOM file has no valid file meta information")
    if "PixelData" not in ds:
        raise ImageError("dicom_no_pixel_data", "The DICOM file contains no image (no Pixel Data)")
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise ImageError("multi_frame", "Multi-frame DICOM files are not supported")
    width, height = int(ds.Columns), int(ds.Rows)
    _check_size(width, height, limits)

    syntax = ds.file_meta.TransferSyntaxUID
    try:
        available = get_decoder(syntax).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise ImageError(
            "dicom_unsupported",
            f"DICOM transfer syntax '{syntax.name}' is not supported; "
            "export the image uncompressed, JPEG or JPEG 2000",
        )
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples not in (1, 3):
        raise ImageError(
            "dicom_unsupported", f"DICOM images with {samples} samples per pixel are not supported"
        )

    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    attributes = _dicom_attributes(ds)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    if arr.ndim == 3:
        # pydicom has already converted YBR to RGB; the VOI module only applies
        # to monochrome data, so colour images go straight to luma.
        step = max(1, max(arr.shape[:2]) // 256)
        sample = arr[::step, ::step].astype(np.float64)
        attributes["colourfulness"] = colourfulness(sample / max(float(sample.max()), 1.0))
        values = arr.astype(np.float64) @ _LUMA
    else:
        # No float cast before the VOI step: a VOI LUT Sequence indexes by integer value.
        values = apply_modality_lut(arr, ds)
        if _has_window(ds) and not ds.get("VOILUTSequence"):
            window = _first_float(ds.WindowCenter), _first_float(ds.WindowWidth)
            if all(math.isfinite(v) for v in window):
                attributes["WindowCenter"], attributes["WindowWidth"] = window
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        if photometric == "MONOCHROME1":
            # MONOCHROME1 stores bone dark; negate so that bone is bright. Presentation
            # LUT Shape is not applied on top: DX requires INVERSE exactly for
            # MONOCHROME1, so honouring both would invert twice.
            values = -values
    if not np.isfinite(values).all():
        raise ImageError("corrupt_image", "The DICOM pixel values are not finite after rescaling")
    pixels = _min_max(values)
    return DecodedImage(
        pixels=pixels,
        media_type=DICOM,
        width=pixels.shape[1],
        height=pixels.shape[0],
        bit_depth=int(ds.get("BitsStored") or ds.get("BitsAllocated") or 0),
        attributes=attributes,
    )


def _dicom_attributes(ds: pydicom.Dataset) -> dict[str, Any]:
    """Copy the allow-listed, non-identifying attributes as JSON-safe values."""
    out: dict[str, Any] = {}
    for keyword in _SAFE_DICOM_KEYWORDS:
        value = ds.get(keyword)
        if isinstance(value, int):
            out[keyword] = int(value)
        elif (text := _safe_text(value)) is not None:
            out[keyword] = text
    spacing = [float(v) for v in ds.get("PixelSpacing") or []]
    if spacing and all(math.isfinite(v) for v in spacing):
        out["PixelSpacing"] = spacing
    if (syntax := _safe_text(ds.file_meta.TransferSyntaxUID)) is not None:
        out["TransferSyntaxUID"] = syntax
    return out


def _safe_text(value: Any) -> str | None:
    """A short printable string, or None; longer values are what a damaged length
    field produces when an element swallows its neighbours (patient name included)."""
    if value is None:
        return None
    text = str(value).strip()
    return text if 0 < len(text) <= 64 and text.isprintable() else None


def _has_window(ds: pydicom.Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def _first_float(value: Any) -> float:
    """Window values may be multi-valued (alternative views); the first one is used."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = value[0]
    return float(value)


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretch to [0, 1] as float32; a constant image becomes zeros rather than NaN."""
    lo, hi = float(values.min()), float(values.max())
    if not hi > lo:
        return np.zeros(values.shape, dtype=np.float32)
    out = ((values - lo) / (hi - lo)).astype(np.float32)
    np.clip(out, 0.0, 1.0, out=out)
    return out
