"""Heatmap overlay cost per PNG compression level, side by side on real X-rays.

    .venv/bin/python bench/overlay.py [--images 40] [--levels 6 3 1]

Decodes the first N COVID images of ../shared/data/cxr/ (the worker's own decoder), gives
each a smooth 7x7 map (what ResNet50's last block yields at 224 px), and times
ml.overlay.overlay_png at each zlib level in turn, twice round, reporting the faster pass.
PNG is lossless: every level decodes to the same pixels (checked here).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ml.imaging import decode_image  # noqa: E402
from ml.overlay import overlay_png  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "cxr" / "images" / "covid"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--levels", type=int, nargs="+", default=[6, 3, 1])
    args = parser.parse_args()
    files = sorted(DATA.glob("*.png"))[: args.images]
    images = [decode_image(f.read_bytes()).pixels for f in files]
    rng = np.random.default_rng(0)
    maps = [np.clip(rng.normal(0.5, 0.3, (7, 7)), 0, 1).astype(np.float32) for _ in images]
    timings: dict[int, list[float]] = {level: [] for level in args.levels}
    sizes: dict[int, int] = {}
    reference = None
    for _ in range(2):
        for level in args.levels:
            start = time.perf_counter()
            out = [
                overlay_png(p, m, compress_level=level) for p, m in zip(images, maps, strict=True)
            ]
            timings[level].append((time.perf_counter() - start) / len(images))
            sizes[level] = sum(map(len, out)) // len(out)
            pixels = [np.asarray(Image.open(io.BytesIO(b))) for b in out[:5]]
            if reference is None:
                reference = pixels
            assert all(np.array_equal(a, b) for a, b in zip(reference, pixels, strict=True))
    shapes = sorted({i.shape for i in images})
    print(f"{len(images)} X-rays, {shapes[0]} to {shapes[-1]} px; ms per overlay, best of 2")
    base = min(timings[args.levels[0]])
    print("| zlib level | ms per overlay | bytes | time vs level", args.levels[0], "|")
    print("|---|---|---|---|")
    for level in args.levels:
        best = min(timings[level])
        print(f"| {level} | {best * 1000:.1f} | {sizes[level]:,} | {best / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
