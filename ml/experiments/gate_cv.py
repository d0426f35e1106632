"""The input gate's fits and threshold rules compared by patient-grouped cross-validation.

    python -m ml.experiments.gate_cv --model DIR --cache NPZ [--only WORD ...]
        [--rule pooled 0.005 --rule per-source 0.02 ...]

Research only; nothing here is served. The shipped rule chooses thresholds on the validation
split alone, and for a small source that is a handful of patients (hannover-mhh: 35 images of
about ten ICU patients), too few to see a failure that the test split shows. Here every image
the gate may learn from (the model's train and val splits, every kind, and all of the model's
training radiographs, not only the quarter the gate fits on) is scored by a fit that did not see
its group: radiographs and lateral/CT images grouped by patient, images made from a radiograph
by its patient, crops by their base picture, generated images by seed. Each variant's thresholds
are then chosen on the out-of-fold scores of the radiographs by each --rule, and it reports
out-of-fold abstention per frontal source and per non-frontal kind. The test split is not read.

Then the shipped fit (train split) is measured on validation and test at three pairs of
thresholds: the shipped rule's (validation, pooled), the first per-source rule's on the
cross-validation, and that rule's P(frontal) threshold with the shipped distance threshold.
The classifier saw its own training radiographs, so figures for them are shown apart from the
validation radiographs'. Results: docs/experiments/gate/README.md ("Fourth session").
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ml.gate import FLAT_STD, STAT_NAMES
from ml.training.gate import (
    CLASSES,
    TRAIN_ONLY_SOURCES,
    extract,
    fit_arrays,
    gate_split,
    make_gate,
    out_of_fold,
    thresholds_for,
)
from ml.training.gate_data import (
    KIND_CLASS,
    Pixels,
    Sample,
    _decoded,
    _derived,
    all_samples,
    cv_folds,
    cv_groups,
    frontal_samples,
    inverted_pairs,
)


def unreadable(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A candidate for the badly exposed class: exposed past reading, not merely washed out
    (nearly all of the film clipped to black or white, swamped by noise, or no contrast left)."""
    way = rng.integers(3)
    if way == 0:
        cut = np.quantile(x, rng.uniform(0.85, 0.97))
        y = (x - cut) * rng.uniform(8, 20) + (0.0 if rng.random() < 0.5 else 0.7)
    elif way == 1:
        y = x * rng.uniform(0.1, 0.25) + 0.55 + rng.normal(0, rng.uniform(0.25, 0.4), x.shape)
    else:
        y = x * rng.uniform(0.03, 0.08) + rng.uniform(0.05, 0.9) + rng.normal(0, 0.02, x.shape)
    return np.clip(y, 0, 1)


def _figure_like(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A frontal radiograph as it may arrive from outside a PACS: a figure of a case report or a
    screen capture (cropped or framed by a border, a few arrows or letters on it, its contrast
    and brightness re-windowed, tilted slightly), still a film the classifier may read."""
    h, w = x.shape
    y = x
    if rng.random() < 0.6:  # cropped in
        ch, cw = int(h * rng.uniform(0.75, 1.0)), int(w * rng.uniform(0.75, 1.0))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        y = y[top:top + ch, left:left + cw]
    # re-windowed: gamma, then a narrower or washed-out range
    y = np.clip(y, 0, 1) ** rng.uniform(0.6, 1.6)
    low, high = rng.uniform(0.0, 0.25), rng.uniform(0.7, 1.0)
    y = low + (high - low) * y if rng.random() < 0.5 else np.clip((y - low) / (high - low), 0, 1)
    im = Image.fromarray((np.clip(y, 0, 1) * 255).astype(np.uint8))
    if rng.random() < 0.5:
        im = im.rotate(float(rng.uniform(-5, 5)), resample=Image.Resampling.BILINEAR,
                       fillcolor=int(rng.choice([0, 255])))
    if rng.random() < 0.5:  # framed: a border of the page or the screen
        side = [int(s * rng.uniform(0.02, 0.15)) for s in (im.width, im.height) * 2]
        canvas = Image.new("L", (im.width + side[0] + side[2], im.height + side[1] + side[3]),
                           int(rng.choice([0, 255, int(rng.integers(0, 256))])))
        canvas.paste(im, (side[0], side[1]))
        im = canvas
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(0, 4))):  # arrows and letters of a figure
        ink = int(rng.choice([0, 255]))
        x0, y0 = int(rng.integers(0, im.width)), int(rng.integers(0, im.height))
        if rng.random() < 0.5:
            dx, dy = (int(v) for v in rng.integers(-im.width // 8, im.width // 8 + 1, 2))
            draw.line([x0, y0, x0 + dx, y0 + dy], fill=ink, width=max(1, im.width // 150))
            draw.ellipse([x0 - 3, y0 - 3, x0 + 3, y0 + 3], fill=ink)
        else:
            draw.text((x0, y0), str(rng.choice(list("ABCDLR"))), fill=ink)
    return np.asarray(im, np.float32) / 255.0


def frontal_variants(frontal: Sequence[Sample], per_image: int, seed: int = 3) -> list[Sample]:
    """per_image figure-like variants (_figure_like) of every radiograph in `frontal` (the
    caller passes the gate's training radiographs),
    each JPEG- or PNG-encoded and decoded as an upload is; kind frontal_variant, class frontal,
    for fitting only (they are never counted as radiographs)."""
    out = []
    for base in frontal:
        for i in range(per_image):
            def load(base: Sample = base, i: int = i) -> Pixels:
                rng = np.random.default_rng([seed, i, int(hashlib.sha256(base.key.encode())
                                                          .hexdigest()[:8], 16)])
                side = int(rng.integers(256, 900))
                pixels = base.load()[0]
                im = Image.fromarray((_figure_like(pixels, rng) * 255).astype(np.uint8))
                im.thumbnail((side, side))
                return _decoded(np.asarray(im), "JPEG" if rng.random() < 0.7 else "PNG")
            out.append(Sample(f"figure{i}:{base.key}", "frontal_variant", "train", base.source,
                              base.label, load))
    return out


def source_balanced(classes: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Sample weights under which every frontal source weighs the same (mean weight 1)."""
    w = np.ones(len(classes))
    frontal = classes == "frontal"
    names = np.unique(sources[frontal])
    for name in names:
        here = frontal & (sources == name)
        w[here] = frontal.sum() / (len(names) * here.sum())
    return w


def shipped_features(model_dir: Path, samples: Sequence[Sample], cache: Path) -> np.ndarray:
    """What the model's shipped gate reads, per sample: its own network (gate.json "features") as
    it is in the artifact (never re-exported), cached beside `cache` under that network's sha256."""
    from ml.backends import usable_cpus
    from ml.training.gate import network_features, shipped_network

    block = shipped_network(model_dir)
    if block is None:
        raise SystemExit(f"{model_dir}: the shipped gate has no intact network of its own")
    return network_features(model_dir, block, samples, cache, usable_cpus())


def _counts(abstained: np.ndarray, groups: list[tuple[str, np.ndarray]]) -> str:
    return ", ".join(f"{name} {int(abstained[g].sum())}/{int(g.sum())}" for name, g in groups if g.any())


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_cv",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--cache", required=True, type=Path, help="features cache (as ml.training.gate's)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--components", type=int, default=64)
    parser.add_argument("--features", choices=["classifier", "shipped"], default="classifier",
                        help="the classifier's pooled features, or the network the model's shipped "
                        "gate reads (gate.json 'features', as served)")
    parser.add_argument("--figures", action="store_true",
                        help="also make a figure-like variant of every radiograph the gate may fit "
                        "on (gate_data.frontal_variants) for the variants that name them")
    parser.add_argument("--inverted-pairs", action="store_true",
                        help="also the inversion of every radiograph the gate may fit on "
                        "(gate_data.inverted_pairs), for the variants that name them")
    parser.add_argument("--only", nargs="*", help="run the variants whose names contain these")
    parser.add_argument("--rule", action="append", nargs=2, metavar=("RULE", "TARGET"),
                        dest="rules", help="threshold rule (pooled or per-source) and the most each "
                        "threshold may abstain on (default: pooled 0.005, per-source 0.02); repeatable")
    args = parser.parse_args(argv)
    rules = [(r, float(t)) for r, t in args.rules or [("pooled", "0.005"), ("per-source", "0.02")]]
    samples = all_samples(args.model, args.cxr, args.ood, keep_sources=TRAIN_ONLY_SOURCES)
    chosen = {s.key for s in samples}
    # The model's training radiographs the gate does not fit on: scored, never fitted (split "cv").
    rest = [replace(s, split="cv") for s in frontal_samples(args.model, args.cxr)
            if s.key not in chosen and s.split == "train" and s.source not in TRAIN_ONLY_SOURCES]
    candidates = _derived("poor_exposure", [s for s in samples if s.kind == "frontal"], 80, 2,
                          unreadable, prefix="unreadable")
    # Figure-like variants of every radiograph the gate may fit on (class frontal, never scored).
    bases = [s for s in samples + rest if s.kind == "frontal" and s.split in ("train", "cv")
             and (s.split == "cv" or gate_split(s) == "train")]
    figures = frontal_variants(bases, 1) if args.figures else []
    pairs = inverted_pairs(bases) if args.inverted_pairs else []
    samples = samples + rest + candidates + figures + pairs
    data = extract(samples, args.model, args.cache)
    if args.features == "shipped":
        data = {**data, "features": shipped_features(args.model, samples, args.cache)}
    stats = data["stats"]
    splits = np.array(["cv" if s.split == "cv" else gate_split(s) for s in samples])
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds = np.array(["unreadable" if s.key.startswith("unreadable:") else s.kind for s in samples])
    sources = np.array([s.source for s in samples])
    figure = kinds == "frontal_variant"
    pair = kinds == "inverse"
    frontal, pool = kinds == "frontal", splits != "test"
    fold = cv_folds(cv_groups(samples, args.cxr, args.ood), args.folds)
    flat = stats[:, STAT_NAMES.index("std")] < FLAT_STD
    old_poor, new_poor, cv_only = kinds == "poor_exposure", kinds == "unreadable", splits == "cv"
    ones = np.ones(len(samples))
    balanced = source_balanced(classes, sources)

    # name -> (which samples may enter a fit, sample weights, whitening shrinkage); the figure-like
    # variants enter only the variants that name them
    Variant = tuple[np.ndarray, np.ndarray, float]
    variants: dict[str, Callable[[], Variant]] = {
        "25% of training radiographs (shipped)": lambda: (~cv_only & ~new_poor, ones, 0.0),
        "all training radiographs": lambda: (~new_poor, ones, 0.0),
        "all, sources weighted equally": lambda: (~new_poor, balanced, 0.0),
        "25%, sources weighted equally": lambda: (~cv_only & ~new_poor, balanced, 0.0),
        "25%, unreadable exposures": lambda: (~cv_only & ~old_poor, ones, 0.0),
        "all, sources weighted equally, unreadable exposures": lambda: (~old_poor, balanced, 0.0),
        "25%, whitening shrunk by 0.05": lambda: (~cv_only & ~new_poor, ones, 0.05),
        "25%, whitening shrunk by 1": lambda: (~cv_only & ~new_poor, ones, 1.0),
        "all + figure-like radiographs": lambda: (~new_poor, ones, 0.0),
        "all + figure-like radiographs, not in the distance": lambda: (~new_poor, ones, 0.0),
        "all + inverted pairs": lambda: (~new_poor, ones, 0.0),
        "all + figure-like radiographs + inverted pairs": lambda: (~new_poor, ones, 0.0),
        "all + polarity model (inverted pairs)": lambda: (~new_poor, ones, 0.0),
        "all + figure-like radiographs + polarity model (inverted pairs)":
            lambda: (~new_poor, ones, 0.0),
    }
    shipped_cv: tuple[float, float] | None = None
    for name, make in variants.items():
        if args.only and not any(word in name for word in args.only):
            continue
        allowed, weights, shrink = make()
        if "figure-like" not in name:
            allowed = allowed & ~figure
        elif not figure.any():
            continue
        if "inverted pairs" not in name:
            allowed = allowed & ~pair
        elif not pair.any():
            continue
        axes = ~figure if name.endswith("not in the distance") else None
        inverses = pair if "polarity model" in name else None
        p_frontal, distance = out_of_fold(data, classes, pool & allowed, pool, fold,
                                          args.components, 0.1, sample_weight=weights, shrink=shrink,
                                          axes_rows=axes, inverses=inverses)
        scored = pool & frontal
        for rule, target in rules:
            thresholds = thresholds_for(p_frontal[scored], distance[scored], target,
                                        sources[scored] if rule == "per-source" else None)
            if name.endswith("(shipped)") and rule == "per-source" and shipped_cv is None:
                shipped_cv = thresholds
            abstained = flat | (p_frontal < thresholds[0]) | (distance > thresholds[1])
            print(f"== {name}, {rule} {target:g}: P(frontal) >= {thresholds[0]:.4f}, "
                  f"distance <= {thresholds[1]:.3f}")
            for split in ("train", "cv", "val"):
                print(f"  radiographs, model's {split}: " + _counts(abstained, [
                    (s, scored & (sources == s) & (splits == split)) for s in np.unique(sources)]))
            print(f"  radiographs abstained by P(frontal): {int((scored & (p_frontal < thresholds[0])).sum())}"
                  f", by distance: {int((scored & (distance > thresholds[1])).sum())}")
            print("  other kinds: " + _counts(abstained, [
                (k, pool & (kinds == k) & ~pair) for k in np.unique(kinds[pool & ~frontal & ~figure])]),
                flush=True)
            if figure.any():
                print("  figure-like radiographs: " + _counts(abstained, [("all", pool & figure)]))

    # The shipped fit (train split) at the shipped thresholds and at the cross-validated ones.
    train = (splits == "train") & ~new_poor & ~figure & ~pair
    gate = make_gate(fit_arrays(data["features"][train], stats[train], classes[train], args.components))
    probabilities, distance = gate.scores(data["features"], stats)
    p_frontal = probabilities[:, CLASSES.index("frontal")]
    val = (splits == "val") & frontal
    shipped = thresholds_for(p_frontal[val], distance[val])
    pairs = {"shipped rule (validation, pooled 0.005)": shipped}
    if shipped_cv is not None:
        pairs["cross-validated, per source"] = shipped_cv
        pairs["cross-validated P(frontal), shipped distance"] = (shipped_cv[0], shipped[1])
    for name, (min_frontal, max_distance) in pairs.items():
        abstained = flat | (p_frontal < min_frontal) | (distance > max_distance)
        print(f"== shipped fit, {name}: P(frontal) >= {min_frontal:.4f}, distance <= {max_distance:.3f}")
        for split in ("val", "test"):
            here = (splits == split) & ~new_poor
            print(f"  {split}: " + _counts(abstained, [(k, here & (kinds == k))
                                                       for k in np.unique(kinds[here & ~frontal])]
                                           + [(s, here & frontal & (sources == s))
                                              for s in np.unique(sources[here & frontal])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
