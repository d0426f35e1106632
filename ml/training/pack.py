"""A training pack: a split's images, preprocessed once, in one portable file.

`python -m ml.training.pack` decodes and preprocesses (ml.preprocess, the serving code) the train and
val images of a split and stores them as 8-bit grey-level images in one .npz, with their
labels, sources and the split's hash. ml.training.portable trains from it on any Keras backend,
on a machine that has neither the data set, TensorFlow nor pydicom (a GPU host); ml.training.package
turns that run into a model artifact here. Test images are never packed, with one
exception: --heldout-source packs every image of a source left out of train and val (as
ml.evaluation.evaluate --leave-one-source-out would score it), so that a GPU host can screen
training recipes across sources; the figures that count still come from ml.evaluation.evaluate.

JPEG (quality 95 by default) keeps a pack small enough to send: at 224 px about 17 kB an
image, a mean absolute error of about 1.4 grey levels (far below the brightness
augmentation's 13); --quality 100 is near lossless at twice the size.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PACK_FORMAT = "cxr-pack-1"
PACKED_SPLITS = ("train", "val")
HELDOUT = "heldout"


@dataclass(frozen=True)
class Pack:
    """A pack read back: grey levels (N, S, S) uint8, targets and source ids per group
    (train, val, and heldout if packed)."""

    gray: dict[str, np.ndarray]
    target: dict[str, np.ndarray]
    source: dict[str, np.ndarray]
    meta: dict


def _encode(gray: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_pack(
    path: str | Path,
    groups: dict,
    size: int,
    preprocess_version: str,
    quality: int,
    provenance: dict,
) -> dict:
    """Preprocess and store each group of records ({"train": [...], ...}); return the
    pack's metadata."""
    from ml.training import data

    sources = sorted({r.source for records in groups.values() for r in records})
    arrays: dict[str, np.ndarray] = {}
    counts = {}
    for name, records in groups.items():
        gray = np.clip(np.rint(data.load_gray_images(records, size, preprocess_version)), 0, 255)
        blobs = [_encode(g.astype(np.uint8), quality) for g in gray]
        arrays[f"{name}_jpeg"] = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        arrays[f"{name}_offsets"] = np.cumsum([0, *map(len, blobs)]).astype(np.int64)
        arrays[f"{name}_target"] = np.array([r.target for r in records], dtype=np.int8)
        arrays[f"{name}_source"] = np.array(
            [sources.index(r.source) for r in records], dtype=np.int16
        )
        counts[name] = len(records)
    meta = {
        "format": PACK_FORMAT,
        "input_size": size,
        "preprocess_version": preprocess_version,
        "jpeg_quality": quality,
        "sources": sources,
        "images": counts,
        **provenance,
    }
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return meta


def read_pack(path: str | Path) -> Pack:
    """Read a pack written by write_pack (numpy and Pillow only: safe on any host)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != PACK_FORMAT:
                raise ValueError(f"not a {PACK_FORMAT} file (format {meta.get('format')!r})")
            gray, target, source = {}, {}, {}
            for name in meta["images"]:
                blob, offsets = z[f"{name}_jpeg"].tobytes(), z[f"{name}_offsets"]
                gray[name] = np.stack(
                    [
                        np.asarray(Image.open(io.BytesIO(blob[a:b])).convert("L"))
                        for a, b in zip(offsets[:-1], offsets[1:], strict=True)
                    ]
                )
                target[name] = z[f"{name}_target"].astype(np.int32)
                source[name] = z[f"{name}_source"].astype(np.int32)
    except (OSError, KeyError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"cannot read pack {path}: {exc}") from exc
    return Pack(gray, target, source, meta)


def split_without(records: list, split: dict, exclude: list[str]) -> tuple[dict, str]:
    """split (read from records' manifest) without the sources in exclude in train and val,
    and that split's sha256 as ml.training.data.write_split would give it."""
    from ml.training import data

    unknown = sorted(set(exclude) - {r.source for r in records})
    if unknown:
        raise ValueError(f"--exclude-source: no source named {unknown} in the manifest")
    split = dict(split)
    for name in PACKED_SPLITS:
        split[name] = [r for r in split[name] if r.source not in exclude]
        if len({r.target for r in split[name]}) < 2:
            raise ValueError(f"the {name} split needs COVID and non-COVID images")
    return split, data.split_sha256(split)


def heldout_records(records: list, source: str, split: dict) -> list:
    """All images of source but those of patients met in train or val through another source
    (linked ids), as ml.evaluation.evaluate --leave-one-source-out selects them."""
    seen = {r.patient_id for name in PACKED_SPLITS for r in split[name] if r.patient_id}
    return [
        r for r in records if r.source == source and not (r.patient_id and r.patient_id in seen)
    ]


def main(argv: list[str] | None = None) -> int:
    """CLI: `python -m ml.training.pack --manifest CSV --split CSV --input-size 224 --out PACK.npz`."""
    import ml.experiments.preprocessing  # noqa: F401  (registers versions 3 and 4)
    from ml.training.config import add_exclude_source, add_image_arguments

    p = argparse.ArgumentParser(prog="python -m ml.training.pack", description=__doc__)
    p.add_argument("--manifest", required=True, help="as ml.training.train's --manifest")
    p.add_argument(
        "--split",
        help="split.csv to reuse (default: a new patient split by --seed, written beside "
        "the pack as OUT.split.csv for ml.training.package)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_exclude_source(p)
    p.add_argument(
        "--heldout-source",
        metavar="NAME",
        help="also pack all images of this (excluded) source, for screening runs across "
        "sources with ml.training.portable",
    )
    add_image_arguments(p, default_size=224)
    p.add_argument("--quality", type=int, default=95, help="JPEG quality, 50-100 (default: 95)")
    p.add_argument("--out", required=True, help="the pack (.npz)")
    args = p.parse_args(argv)
    if args.input_size < 32 or not 50 <= args.quality <= 100:
        p.error("--input-size must be at least 32 and --quality within 50-100")
    if args.heldout_source and args.heldout_source not in args.exclude_source:
        p.error("--heldout-source must also be an --exclude-source")
    from ml.training import data

    split_file = args.split
    try:
        records = data.load_manifest(args.manifest)
        if not split_file:
            # ml.training.package needs the very split: keep the one made here beside the pack.
            split_file = str(Path(args.out).with_suffix(".split.csv"))
            data.write_split(data.split_by_patient(records, 0.15, 0.15, args.seed), split_file)
        full = data.read_split(split_file, records)
        split, sha = split_without(records, full, args.exclude_source)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    groups = {name: split[name] for name in PACKED_SPLITS}
    if args.heldout_source:
        groups[HELDOUT] = heldout_records(records, args.heldout_source, split)
    provenance = {
        "manifest": str(Path(args.manifest).resolve()),
        "split_file": str(Path(split_file).resolve()),
        "split_sha256": sha,
        "excluded_sources": sorted(args.exclude_source),
        "heldout_source": args.heldout_source,
        "seed": args.seed,
    }
    try:
        meta = write_pack(
            args.out, groups, args.input_size, args.preprocess_version, args.quality, provenance
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {meta['images']} images, {size / 2**20:.1f} MiB, split {sha[:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
