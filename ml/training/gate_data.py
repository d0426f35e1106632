"""The images the input gate is fitted and measured on: frontal radiographs and everything else.

Frontal radiographs come from the model's own split.csv (train fits, val sets
thresholds, test only reports). Lateral X-rays and CT come from the shared OOD
set, split by patient. Photographs, documents, microscopy, noise and flat
images are made here or taken from the sample images inside the scikit-image
wheel (no download), split by base image or seed. Inverted and badly exposed
radiographs are made from frontal images of the same split. Every synthetic
image is encoded as PNG or JPEG and decoded by ml.imaging, as an upload is.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ml.imaging import decode_image

Pixels = tuple[np.ndarray, dict[str, Any]]
SPLITS = ("train", "val", "test")
# Kind -> the class the gate's classifier learns for it.
KIND_CLASS = {"frontal": "frontal", "frontal_variant": "frontal", "lateral_xray": "lateral",
              "ct": "ct", "photo": "other", "document": "other", "microscopy": "other",
              "noise": "other", "flat": "poor", "inverted": "inverted", "poor_exposure": "poor",
              "inverse": "inverted"}
# Base images inside the scikit-image wheel, by the split they serve (none is downloaded).
PHOTO_BASES = {"train": ["astronaut", "chelsea", "coffee", "rocket", "grass", "moon", "clock"],
               "val": ["camera", "coins", "brick"],
               "test": ["stereo_motorcycle", "hubble_deep_field", "gravel", "retina", "horse"]}
MICROSCOPY_BASES = {"train": ["immunohistochemistry"], "val": [], "test": ["cell"]}
DOCUMENT_BASES = {"train": ["page"], "val": [], "test": ["text", "logo"]}


@dataclass(frozen=True)
class Sample:
    """One image of the gate's data: what it is, which split, and how to get its pixels."""

    key: str
    kind: str
    split: str
    source: str
    label: str
    load: Callable[[], Pixels]


def split_of(group: str, val: float = 0.2, test: float = 0.3) -> str:
    """A stable split for a group id (patient, base image, seed) from its hash."""
    u = int(hashlib.sha256(group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "val" if u < test + val else "train"


def _decoded(rgb_or_gray: np.ndarray, fmt: str) -> Pixels:
    """Encode uint8 pixels as PNG or JPEG and decode them the way an upload is."""
    buf = io.BytesIO()
    Image.fromarray(rgb_or_gray).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    image = decode_image(buf.getvalue())
    return image.pixels, image.attributes


def _file(path: Path) -> Callable[[], Pixels]:
    def load() -> Pixels:
        image = decode_image(path.read_bytes())
        return image.pixels, image.attributes
    return load


def frontal_samples(model_dir: Path, cxr_dir: Path) -> list[Sample]:
    """Every manifest image with its split from the model's split.csv."""
    with open(Path(model_dir) / "split.csv", newline="") as f:
        splits = {r["file"]: r["split"] for r in csv.DictReader(f)}
    with open(cxr_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [Sample(r["file"], "frontal", splits[r["file"]], r["source"], r["label"],
                   _file(cxr_dir / r["file"])) for r in rows if r["file"] in splits]


def ood_samples(ood_dir: Path, variants: int = 0) -> list[Sample]:
    """Lateral X-rays and CT of ../shared/data/ood, split by patient; training ones also as
    `variants` random crops, flips and contrast changes (3 measured no better on validation)."""
    with open(ood_dir / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        split = split_of(r["patient_id"])
        out.append(Sample(r["file"], r["kind"], split, "ood", r["kind"], _file(ood_dir / r["file"])))
        for i in range(variants if split == "train" else 0):
            def load(path: Path = ood_dir / r["file"], i: int = i) -> Pixels:
                pixels, _ = _file(path)()
                rng = np.random.default_rng([i, len(str(path))])
                arr = _variant((pixels * 255).astype(np.uint8), rng, grey=True).astype(np.float32)
                return np.clip((arr / 255.0) ** rng.uniform(0.7, 1.4), 0, 1).astype(np.float32), {}
            out.append(Sample(f"{r['file']}:v{i}", r["kind"], split, "ood", r["kind"], load))
    return out


@functools.lru_cache(maxsize=8)
def _skimage(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    return np.asarray(image[0] if name == "stereo_motorcycle" else image)


def _variant(base: np.ndarray, rng: np.random.Generator, grey: bool) -> np.ndarray:
    """A random crop, flip and size of a base picture, in colour or grey."""
    arr = base if base.ndim == 3 else np.stack([base] * 3, -1)
    arr = (arr[..., :3].astype(np.float32) / max(float(arr.max()), 1.0) * 255).astype(np.uint8)
    h, w = arr.shape[:2]
    ch, cw = int(h * rng.uniform(0.5, 1.0)), int(w * rng.uniform(0.5, 1.0))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    im = Image.fromarray(arr[y:y + ch, x:x + cw])
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(160, 900))
    scale = side / max(im.size)
    im = im.resize((max(32, int(im.width * scale)), max(32, int(im.height * scale))))
    return np.asarray(im.convert("L") if grey else im)


def _picture_samples(kind: str, bases: dict[str, list[str]], per_base: int) -> list[Sample]:
    out = []
    for split, names in bases.items():
        for name in names:
            for i in range(per_base):
                def load(name: str = name, i: int = i) -> Pixels:
                    rng = np.random.default_rng([i, len(name)])
                    arr = _variant(_skimage(name), rng, grey=i % 2 == 1)
                    return _decoded(arr, "JPEG" if i % 3 else "PNG")
                out.append(Sample(f"{kind}:{name}:{i}", kind, split, name, kind, load))
    return out


def _faces(split_for: Callable[[int], str]) -> list[Sample]:
    """Portraits from the LFW subset shipped in the wheel, enlarged, one sample each."""
    def load(i: int) -> Pixels:
        face = np.asarray(_skimage("lfw_subset")[i] * 255, np.uint8)
        return _decoded(np.asarray(Image.fromarray(face).resize((200, 200))), "JPEG")
    return [Sample(f"photo:face:{i}", "photo", split_for(i), "lfw", "photo",
                   lambda i=i: load(i)) for i in range(0, 200, 4)]


def _document(seed: int) -> Pixels:
    """A page of text lines, a table or a form, as printed, scanned or screen-captured."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(300, 900)), int(rng.integers(300, 1100))
    paper = int(rng.integers(200, 256))
    im = Image.new("L", (w, h), paper)
    draw = ImageDraw.Draw(im)
    y = int(rng.integers(10, 40))
    words = ["patient", "chest", "film", "report", "impression", "normal", "heart", "lungs", "clear", "date", "signed"]
    while y < h - 20:
        if rng.random() < 0.15:
            draw.rectangle([10, y, w - 10, y + int(rng.integers(20, 80))], outline=0)
        text = " ".join(rng.choice(words, int(rng.integers(3, 12))))
        draw.text((int(rng.integers(5, 40)), y), text, fill=int(rng.integers(0, 80)))
        y += int(rng.integers(12, 30))
    arr = np.asarray(im, np.float32)
    if seed % 3 == 0:  # scanned: grain and a tilt
        arr = arr + rng.normal(0, 8, arr.shape)
        arr = np.asarray(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).rotate(
            float(rng.uniform(-4, 4)), fillcolor=int(paper * 0.6)), np.float32)
    return _decoded(np.clip(arr, 0, 255).astype(np.uint8), "JPEG" if seed % 2 else "PNG")


def _microscopy(seed: int) -> Pixels:
    """Stained cells: blurred random blobs in a stain colour on a light field."""
    from skimage.data import binary_blobs

    rng = np.random.default_rng(seed)
    blobs = binary_blobs(256, blob_size_fraction=float(rng.uniform(0.03, 0.1)),
                         volume_fraction=float(rng.uniform(0.1, 0.4)), rng=seed).astype(np.float32)
    stain = rng.uniform(0.2, 0.9, 3)
    rgb = 1.0 - blobs[..., None] * (1.0 - stain) + rng.normal(0, 0.03, (256, 256, 3))
    return _decoded((np.clip(rgb, 0, 1) * 255).astype(np.uint8), "PNG")


def _noise(seed: int) -> Pixels:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(64, 1024)), int(rng.integers(64, 1024))
    shape = (h, w, 3) if seed % 2 else (h, w)
    kind = seed % 4
    if kind == 0:
        arr = rng.random(shape)
    elif kind == 1:
        arr = np.clip(rng.normal(rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.3), shape), 0, 1)
    elif kind == 2:
        arr = (rng.random(shape) < rng.uniform(0.1, 0.9)).astype(np.float64)
    else:  # smooth noise: low-resolution noise enlarged
        low = (rng.random((int(rng.integers(4, 32)),) * 2) * 255).astype(np.uint8)
        arr = np.asarray(Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)) / 255.0
    return _decoded((arr * 255).astype(np.uint8), "PNG" if seed % 3 else "JPEG")


def _flat(seed: int) -> Pixels:
    rng = np.random.default_rng(seed)
    h, w = int(rng.integers(64, 1024)), int(rng.integers(64, 1024))
    level = rng.uniform(0, 1, 3 if seed % 2 else 1)
    arr = np.broadcast_to(level, (h, w, len(level))).copy()
    if seed % 3 == 0:  # a ramp: no content either
        arr *= np.linspace(rng.uniform(0.3, 1), 1, w)[None, :, None]
    arr = arr + rng.normal(0, 0.005, arr.shape)
    arr = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return _decoded(arr[..., 0] if arr.shape[-1] == 1 else arr, "PNG")


def _seeded(kind: str, make: Callable[[int], Pixels], n: int, offset: int) -> list[Sample]:
    return [Sample(f"{kind}:{s}", kind, split_of(f"{kind}:{s}"), "synthetic", kind,
                   lambda s=s: make(s)) for s in range(offset, offset + n)]


def _derived(kind: str, frontal: list[Sample], n: int, seed: int,
             change: Callable[[np.ndarray, np.random.Generator], np.ndarray],
             prefix: str = "") -> list[Sample]:
    """n images per split made from frontal radiographs of that split (keys: prefix or kind,
    then the radiograph's key)."""
    rng = np.random.default_rng(seed)
    out = []
    for split in SPLITS:
        pool = [s for s in frontal if s.split == split]
        for j in rng.choice(len(pool), min(n, len(pool)), replace=False):
            base = pool[int(j)]

            def load(base: Sample = base, j: int = int(j)) -> Pixels:
                pixels, attrs = base.load()
                return change(pixels, np.random.default_rng(j)).astype(np.float32), attrs
            out.append(Sample(f"{prefix or kind}:{base.key}", kind, split, base.source, kind, load))
    return out


def _badly_exposed(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burnt out (most pixels clipped black or white) or swamped by quantum noise."""
    if rng.random() < 0.5:
        cut = np.quantile(x, rng.uniform(0.6, 0.85))
        y = (x - cut) * rng.uniform(3, 8) + (0.0 if rng.random() < 0.5 else 0.5)
    else:
        y = x * 0.3 + 0.6 + rng.normal(0, rng.uniform(0.15, 0.3), x.shape)
    return np.clip(y, 0, 1)


def inverted_pairs(frontal: Sequence[Sample]) -> list[Sample]:
    """The inversion (1 - x) of every radiograph in `frontal` (the caller passes the gate's
    training radiographs), kind inverse, split train: beside each film its own negative, for the
    gate's polarity model, which then learns polarity alone, not source or framing."""
    def load(base: Sample) -> Pixels:
        pixels, attrs = base.load()
        return (1.0 - pixels).astype(np.float32), attrs
    return [Sample(f"inverse:{base.key}", "inverse", "train", base.source, "inverted",
                   lambda base=base: load(base)) for base in frontal]


def all_samples(model_dir: Path, cxr_dir: Path, ood_dir: Path, scale: int = 1,
                train_fraction: float = 0.25, keep_sources: Sequence[str] = (),
                min_per_source: int = 0) -> list[Sample]:
    """Every sample of every kind; scale multiplies the synthetic counts. Of the model's training
    radiographs train_fraction is used (all of them measured slightly worse on validation:
    photographs 100% -> 94% abstained, hannover-mhh 9% -> 11%), except those of keep_sources;
    each other source then gives at least min_per_source of them (or all it has), chosen by hash."""
    every = frontal_samples(model_dir, cxr_dir)
    frontal = [s for s in every
               if s.split != "train" or (s.source in keep_sources and split_of(s.key) == "test")
               or split_of(f"fit:{s.key}", val=0.0, test=train_fraction) == "test"]
    if min_per_source:
        chosen = {s.key for s in frontal}
        for source in sorted({s.source for s in every} - set(keep_sources)):
            have = sum(s.source == source and s.split == "train" for s in frontal)
            more = sorted((s for s in every if s.source == source and s.split == "train"
                           and s.key not in chosen),
                          key=lambda s: hashlib.sha256(f"more:{s.key}".encode()).hexdigest())
            frontal += more[:max(0, min_per_source - have)]
    return (
        frontal + ood_samples(ood_dir)
        + _picture_samples("photo", PHOTO_BASES, 12 * scale)
        + _faces(lambda i: "test" if i % 20 < 8 else "train")
        + _picture_samples("microscopy", MICROSCOPY_BASES, 20 * scale)
        + _picture_samples("document", DOCUMENT_BASES, 15 * scale)
        + _seeded("document", _document, 100 * scale, 0)
        + _seeded("microscopy", _microscopy, 60 * scale, 0)
        + _seeded("noise", _noise, 120 * scale, 0) + _seeded("flat", _flat, 60 * scale, 0)
        + _derived("inverted", frontal, 80 * scale, 1, lambda x, _: 1.0 - x)
        + _derived("poor_exposure", frontal, 80 * scale, 2, _badly_exposed)
    )


def cv_groups(samples: Sequence[Sample], cxr_dir: Path, ood_dir: Path) -> np.ndarray:
    """What each sample is kept together with across folds (see the module docstring)."""
    patient = {}
    for manifest in (Path(cxr_dir) / "manifest.csv", Path(ood_dir) / "manifest.csv"):
        with open(manifest, newline="") as f:
            patient.update({r["file"]: r["patient_id"] or r["file"] for r in csv.DictReader(f)})
    out = []
    for s in samples:
        base = (s.key.split(":", 1)[1]
                if s.kind in ("inverted", "poor_exposure", "frontal_variant", "inverse")
                else s.key)
        if base in patient:
            out.append(patient[base])
        elif s.source not in ("synthetic", "lfw"):
            out.append(f"base:{s.source}")  # a scikit-image picture and its crops
        else:
            out.append(s.key)
    return np.array(out)


def cv_folds(groups: np.ndarray, folds: int = 5) -> np.ndarray:
    """A stable fold per group, from its hash."""
    return np.array([int(hashlib.sha256(f"cv:{g}".encode()).hexdigest()[:8], 16) % folds
                     for g in groups])
