"""Preprocessing cost per version, side by side on real X-rays, and where v3 finds lungs.

    .venv/bin/python bench/preprocess.py [--per-source 20] [--size 224] [--upscale 9]

Decodes the first N images of each source in ../shared/data/cxr/manifest.csv (the worker's
own decoder), then times ml.preprocess.preprocess_gray for each version in turn, twice
round, reporting the faster pass: on the images as stored (at most 336 px) and enlarged
--upscale times (about 3,000 px, the size of a real upload). Also counts, per source, how
often version 3's lung box is found and how much of the image it keeps.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.imaging import decode_image  # noqa: E402
from ml.preprocess import (  # noqa: E402
    SUPPORTED_PREPROCESS_VERSIONS,
    _shrink,
    crop_borders,
    equalize,
    lung_box,
    preprocess_gray,
)

DATA = ROOT.parent / "shared" / "data" / "cxr"


def _time(images: list[np.ndarray], size: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(2):
        for version in SUPPORTED_PREPROCESS_VERSIONS:
            start = time.perf_counter()
            for pixels in images:
                preprocess_gray(pixels, size, version=version)
            ms = 1000 * (time.perf_counter() - start) / len(images)
            best[version] = min(ms, best.get(version, ms))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-source", type=int, default=20)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--upscale", type=int, default=9)
    args = parser.parse_args()
    with open(DATA / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    chosen: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if len(chosen[row["source"]]) < args.per_source:
            chosen[row["source"]].append(row)
    images, sources = [], []
    for source, picked in sorted(chosen.items()):
        for row in picked:
            images.append(decode_image((DATA / row["file"]).read_bytes()).pixels)
            sources.append(source)

    found: dict[str, list[float]] = defaultdict(list)
    for pixels, source in zip(images, sources, strict=True):
        eq = equalize(crop_borders(_shrink(pixels)))
        box = lung_box(eq)
        if box is None:
            found[source].append(np.nan)
        else:
            rows, cols = box
            found[source].append((rows.stop - rows.start) * (cols.stop - cols.start) / eq.size)

    big = [
        np.asarray(
            Image.fromarray(p, mode="F").resize(
                (p.shape[1] * args.upscale, p.shape[0] * args.upscale), Image.Resampling.BILINEAR
            )
        )
        for p in images[:: max(1, len(images) // 20)]
    ]
    stored, large = _time(images, args.size), _time(big, args.size)
    shapes = sorted({i.shape for i in images})
    print(f"{len(images)} X-rays ({args.per_source} per source), {shapes[0]} to {shapes[-1]} px;")
    print(f"{len(big)} of them enlarged {args.upscale}x; preprocess_gray to {args.size} px")
    print("| version | ms per image, as stored | vs v2 | ms per image, enlarged | vs v2 |")
    print("|---|---|---|---|---|")
    for v in SUPPORTED_PREPROCESS_VERSIONS:
        print(
            f"| {v} | {stored[v]:.1f} | {stored[v] / stored['2']:.2f} "
            f"| {large[v]:.1f} | {large[v] / large['2']:.2f} |"
        )
    print()
    print("| source | images | v3 lung box found | mean share of the image kept |")
    print("|---|---|---|---|")
    for source, shares in sorted(found.items()):
        hit = [s for s in shares if not np.isnan(s)]
        mean = f"{np.mean(hit):.2f}" if hit else "n/a"
        print(f"| {source} | {len(shares)} | {len(hit)} | {mean} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
