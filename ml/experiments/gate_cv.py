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
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

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
    Sample,
    _derived,
    all_samples,
    cv_folds,
    cv_groups,
    frontal_samples,
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
    samples = samples + rest + candidates
    data = extract(samples, args.model, args.cache)
    if args.features == "shipped":
        data = {**data, "features": shipped_features(args.model, samples, args.cache)}
    stats = data["stats"]
    splits = np.array(["cv" if s.split == "cv" else gate_split(s) for s in samples])
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds = np.array(["unreadable" if s.key.startswith("unreadable:") else s.kind for s in samples])
    sources = np.array([s.source for s in samples])
    frontal, pool = classes == "frontal", splits != "test"
    fold = cv_folds(cv_groups(samples, args.cxr, args.ood), args.folds)
    flat = stats[:, STAT_NAMES.index("std")] < FLAT_STD
    old_poor, new_poor, cv_only = kinds == "poor_exposure", kinds == "unreadable", splits == "cv"
    ones = np.ones(len(samples))
    balanced = source_balanced(classes, sources)

    # name -> (which samples may enter a fit, sample weights, whitening shrinkage)
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
    }
    shipped_cv: tuple[float, float] | None = None
    for name, make in variants.items():
        if args.only and not any(word in name for word in args.only):
            continue
        allowed, weights, shrink = make()
        p_frontal, distance = out_of_fold(data, classes, pool & allowed, pool, fold,
                                          args.components, 0.1, sample_weight=weights, shrink=shrink)
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
                (k, pool & (kinds == k)) for k in np.unique(kinds[pool & ~frontal])]), flush=True)

    # The shipped fit (train split) at the shipped thresholds and at the cross-validated ones.
    train = (splits == "train") & ~new_poor
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
