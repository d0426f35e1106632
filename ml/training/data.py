"""Training data: manifests, patient-disjoint splits and the preprocessed image cache (no TF here)."""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml.preprocess import PREPROCESS_VERSION, preprocess_gray

SPLITS = ("train", "val", "test")
MANIFEST_COLUMNS = ("file", "label", "patient_id", "source", "view")
MANIFEST_FILE = "manifest.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
# Folder names people give the positive class; all are stored as the label "covid".
_COVID_ALIASES = {"covid", "covid-19", "covid19", "covid_19"}

# Training augmentation strengths (ml.training.pipeline, ml.training.portable): rotation in degrees;
# shift, zoom, brightness, contrast as fractions. Mild: a radiograph's position varies
# little. Strong (--augment strong) also varies what differs between collections rather
# than patients: exposure curve (gamma), sharpness (scanner and compression) and noise.
STRENGTHS = {
    "mild": (7.0, 0.06, 0.08, 0.05, 0.10),
    "strong": (15.0, 0.10, 0.15, 0.10, 0.25),
    # patch: magnified 1x to 2x (a window of 25-100% of the area) anywhere inside the image,
    # so the model must decide from part of a chest; shift is implied by the magnification.
    "patch": (7.0, 0.0, 1.0, 0.05, 0.10),
}
GAMMA, SHARPNESS, NOISE = 1.5, 1.0, 6.0  # strong only: gamma in [1/1.5, 1.5], noise sd <= 6


def affine_rows(u, height, width, strength: str, xp):
    """The projective-transform rows of the augmentation's random affine, one per image.

    u holds uniform draws in [-1, 1] (columns 0-3: rotation, zoom, x and y shift); xp is
    the array namespace of u (tensorflow in ml.training.pipeline, keras.ops in ml.training.portable).
    Each row maps an output pixel to the input pixel it samples: rotate and zoom about the
    centre, then shift. "patch" magnifies by 1 to 1 + zoom and shifts the window anywhere
    it stays inside the image (up to half the margin the magnification leaves per side).
    """
    rotation, shift, zoom = STRENGTHS[strength][:3]
    angle = u[:, 0] * (rotation * math.pi / 180.0)
    if strength == "patch":
        inv_zoom = 1.0 / (1.0 + (u[:, 1] + 1.0) * (zoom / 2.0))
        reach = (1.0 - inv_zoom) / 2.0
        tx, ty = u[:, 2] * reach * width, u[:, 3] * reach * height
    else:
        inv_zoom = 1.0 / (1.0 + u[:, 1] * zoom)
        tx, ty = u[:, 2] * shift * width, u[:, 3] * shift * height
    cos, sin = xp.cos(angle) * inv_zoom, xp.sin(angle) * inv_zoom
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    zero = xp.zeros_like(cos)
    return xp.stack(
        [
            cos,
            -sin,
            cx - cos * cx + sin * cy - tx,
            sin,
            cos,
            cy - sin * cx - cos * cy - ty,
            zero,
            zero,
        ],
        axis=1,
    )


@dataclass(frozen=True)
class Record:
    """One labelled image; target is 1 for COVID-19, 0 for everything else."""

    path: Path
    label: str
    target: int
    source: str
    patient_id: str | None
    view: str
    file: str = ""  # the path as written in the manifest (relative to it); the split key

    @property
    def key(self) -> str:
        """The name of this image in split files."""
        return self.file or self.path.as_posix()


def _record(root: Path, file: str, label: str, source: str, patient_id: str, view: str) -> Record:
    label = label.strip().lower()
    if label in _COVID_ALIASES:
        label = "covid"
    return Record(
        path=root / file,
        label=label,
        target=int(label == "covid"),
        source=source.strip() or "unknown",
        patient_id=patient_id.strip() or None,
        view=view.strip() or "unknown",
        file=file,
    )


def _from_csv(path: Path) -> list[Record]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"manifest {path} lacks column(s) {missing}; needs {list(MANIFEST_COLUMNS)}"
            )
        records = []
        for line, row in enumerate(reader, start=2):
            if not (row["file"] or "").strip() or not (row["label"] or "").strip():
                raise ValueError(f"manifest {path} line {line}: empty file or label")
            records.append(
                _record(
                    path.parent,
                    row["file"].strip(),
                    row["label"],
                    row["source"] or "",
                    row["patient_id"] or "",
                    row["view"] or "",
                )
            )
    missing_files = [r.file for r in records if not r.path.is_file()]
    if missing_files:
        raise ValueError(
            f"manifest {path}: {len(missing_files)} listed file(s) do not exist, "
            f"e.g. {missing_files[:3]}"
        )
    return records


def _from_folders(root: Path) -> list[Record]:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(
            f"{root} is neither a manifest CSV nor a folder with one subfolder per class "
            f"(covid/, normal/, ...) or a {MANIFEST_FILE}"
        )
    records = []
    for folder in classes:
        for image in sorted(folder.rglob("*")):
            if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES:
                file = image.relative_to(root).as_posix()
                records.append(_record(root, file, folder.name, "folder", "", "unknown"))
    return records


def load_manifest(path: str | Path) -> list[Record]:
    """Read a CSV manifest, or a folder holding a manifest.csv or one subfolder per class."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_FILE).is_file():
        path = path / MANIFEST_FILE
    if path.is_file():
        records = _from_csv(path)
    elif path.is_dir():
        records = _from_folders(path)
    else:
        raise ValueError(f"manifest {path} does not exist")
    if not records:
        raise ValueError(f"no images found in {path}")
    return records


def _patient_source(records: Sequence[Record]) -> str:
    counts = Counter(r.source for r in records)
    return min(counts, key=lambda s: (-counts[s], s))


def split_by_patient(
    records: Sequence[Record],
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Patient-disjoint train/val/test split, stratified by (target, source) of each patient.

    A patient is COVID if any of their images is. Images without a patient id cannot be
    kept apart from their other images, so they all go to train. Fractions are of images.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must be below 1")
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction}
    fractions["test"] = test_fraction
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        if r.patient_id is not None:
            by_patient[r.patient_id].append(r)
    strata: dict[tuple[int, str], list[str]] = defaultdict(list)
    for pid, group in by_patient.items():
        strata[(max(r.target for r in group), _patient_source(group))].append(pid)

    rng = np.random.default_rng(seed)
    assigned: dict[str, str] = {}
    for stratum in sorted(strata):
        pids = sorted(strata[stratum])
        total = sum(len(by_patient[p]) for p in pids)
        filled = dict.fromkeys(SPLITS, 0)
        for i in rng.permutation(len(pids)):
            # Greedy: each patient goes where the image count is furthest below its target.
            name = max(
                (s for s in SPLITS if fractions[s] > 0),
                key=lambda s: fractions[s] * total - filled[s],
            )
            assigned[pids[i]] = name
            filled[name] += len(by_patient[pids[i]])

    split: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for r in records:
        split["train" if r.patient_id is None else assigned[r.patient_id]].append(r)
    return split


def check_patient_disjoint(split: dict[str, list[Record]]) -> None:
    """Raise ValueError if a patient is in two splits or an image without id is outside train."""
    seen: dict[str, str] = {}
    for name, records in split.items():
        for r in records:
            if r.patient_id is None:
                if name != "train":
                    raise ValueError(f"{name} holds images without a patient id")
            elif seen.setdefault(r.patient_id, name) != name:
                raise ValueError(f"a patient is in both {seen[r.patient_id]} and {name}")


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


def split_summary(split: dict[str, list[Record]]) -> dict:
    """Per split: image and patient counts, by target, source and label (no identifiers)."""
    return {
        name: {
            "images": len(records),
            "patients": len({r.patient_id for r in records if r.patient_id is not None}),
            "images_without_patient_id": sum(r.patient_id is None for r in records),
            "by_target": _counts("covid" if r.target else "non-covid" for r in records),
            "by_source": _counts(r.source for r in records),
            "by_label": _counts(r.label for r in records),
        }
        for name, records in split.items()
    }


def _split_csv(split: dict[str, list[Record]]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "split"])
    for name in SPLITS:
        for r in split.get(name, []):
            writer.writerow([r.key, name])
    return buf.getvalue().encode("utf-8")


def split_sha256(split: dict[str, list[Record]]) -> str:
    """The sha256 hex of the file write_split would write for this split."""
    return hashlib.sha256(_split_csv(split)).hexdigest()


def write_split(split: dict[str, list[Record]], path: str | Path) -> str:
    """Write the split as CSV "file,split"; return the sha256 hex of the file."""
    data = _split_csv(split)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def read_split(path: str | Path, records: Sequence[Record]) -> dict[str, list[Record]]:
    """Rebuild a split written by write_split from the manifest's records."""
    by_key = {r.key: r for r in records}
    split: dict[str, list[Record]] = {name: [] for name in SPLITS}
    seen: set[str] = set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != ["file", "split"]:
            raise ValueError(f"split file {path} must have the columns file,split")
        for line, row in enumerate(reader, start=2):
            key, name = row["file"], row["split"]
            if name not in split:
                raise ValueError(f"split file {path} line {line}: unknown split {name!r}")
            if key not in by_key:
                raise ValueError(
                    f"split file {path} line {line}: {key!r} is not in the manifest "
                    "(was the split made from another manifest?)"
                )
            if key in seen:
                raise ValueError(f"split file {path} line {line}: {key!r} is listed twice")
            seen.add(key)
            split[name].append(by_key[key])
    check_patient_disjoint(split)
    return split


def load_gray_images(
    records: Sequence[Record], size: int, version: str = PREPROCESS_VERSION
) -> np.ndarray:
    """Decode and preprocess each image once: (N, size, size) float32 grey levels in [0, 255].

    ml.preprocess.to_caffe of row i equals ml.preprocess.preprocess(image i): the model
    sees exactly what serving would give it.
    """
    from ml.imaging import decode_image  # pydicom: only where images are decoded

    out = np.empty((len(records), size, size), dtype=np.float32)
    for i, r in enumerate(records):
        try:
            pixels = decode_image(r.path.read_bytes()).pixels
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot use training image {r.key}: {exc}") from exc
        out[i] = preprocess_gray(pixels, size, version=version)
    return out


def limit_per_class(records: Sequence[Record], n: int) -> list[Record]:
    """The first n COVID and the first n non-COVID records, in manifest order."""
    taken = {0: 0, 1: 0}
    kept = []
    for r in records:
        taken[r.target] += 1
        if taken[r.target] <= n:
            kept.append(r)
    return kept


def class_weights(records: Sequence[Record]) -> np.ndarray:
    """Per-image loss weights that give both classes the same total weight."""
    return target_class_weights([r.target for r in records])


def target_class_weights(targets: Sequence[int] | np.ndarray) -> np.ndarray:
    """class_weights for a sequence of 0/1 targets."""
    y = np.asarray(targets, dtype=np.intp)
    counts = np.bincount(y, minlength=2)
    return (len(y) / (2.0 * counts[y])).astype(np.float32)


def source_balanced_probabilities(records: Sequence[Record]) -> np.ndarray:
    """Sampling probabilities: each class half the draws, shared equally by its sources.

    The sources of this data set are confounded with the label; drawing each (source,
    class) group equally often keeps the big single-class sources from dominating.
    """
    return group_balanced_probabilities([r.target for r in records], [r.source for r in records])


def group_balanced_probabilities(targets: Sequence[int], sources: Sequence) -> np.ndarray:
    """source_balanced_probabilities for parallel sequences of targets and source labels."""
    groups = list(zip(targets, sources, strict=True))
    size = Counter(groups)
    sources_per_class = Counter(target for target, _ in size)
    p = np.array([0.5 / sources_per_class[g[0]] / size[g] for g in groups])
    return p / p.sum()


def epoch_order(
    n: int, epoch: int, seed: int, probabilities: np.ndarray | None = None
) -> np.ndarray:
    """Image indices for one epoch: a permutation, or n weighted draws with replacement.

    Depends only on (seed, epoch), so a resumed run sees what an unbroken one would have.
    """
    rng = np.random.default_rng([seed, epoch])
    if probabilities is None:
        return rng.permutation(n).astype(np.int32)
    return rng.choice(n, size=n, replace=True, p=probabilities).astype(np.int32)
