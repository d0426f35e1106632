"""The input gate's alternatives, measured against the shipped fit on cached features.

    python -m ml.experiments.gate_variants --model DIR [--cache NPZ]

Research only; nothing here is served. Each variant changes one part of the gate
(ml.training.gate) and keeps the shipped threshold rule (each threshold abstains on at most
0.5% of validation radiographs):

- ``centroids``: the distance to the nearest per-source centroid of the training radiographs,
  in the shipped whitening, instead of the distance to their overall mean;
- ``within-source``: the same with the whitening fitted on each source's deviations from its
  own mean (a tied covariance, as in class-conditional Mahalanobis detectors);
- ``features-only``: the kind classifier without the image statistics.

It prints, per split, how many images of each non-frontal kind and of each frontal source
every variant abstains on, and how well the energy score of the COVID logit (Liu et al. 2020)
tells validation and test radiographs from each non-frontal kind (AUROC; 0.5 is chance).
Results: docs/experiments/gate/README.md ("Third session").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ml.evaluation.metrics import auroc
from ml.gate import FLAT_STD, STAT_NAMES
from ml.training.gate import (
    CLASSES,
    TRAIN_ONLY_SOURCES,
    extract,
    fit_arrays,
    gate_split,
    make_gate,
    thresholds_for,
)

COMPONENTS = 64


def energy(probability: np.ndarray) -> np.ndarray:
    """-log(1 + e^z) for the COVID logit z: the energy of the two logits (0, z), higher for a
    more out-of-distribution input by the method's premise. With one sigmoid output it is a
    decreasing function of P(COVID) and reads nothing else."""
    p = np.clip(np.asarray(probability, np.float64), 1e-7, 1 - 1e-7)
    return -np.logaddexp(0.0, np.log(p / (1 - p)))


def nearest_centroid(z: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Mean squared distance of each row of z to the nearest row of centroids."""
    return np.min([((z - c) ** 2).mean(axis=1) for c in centroids], axis=0)


def within_source(features: np.ndarray, fit: np.ndarray, sources: np.ndarray,
                  components: int = COMPONENTS) -> np.ndarray:
    """Distance to the nearest source mean, whitened by the sources' pooled within-source
    spread (fit: the training radiographs' rows)."""
    names = np.unique(sources[fit])
    means = np.stack([features[fit & (sources == n)].mean(axis=0) for n in names])
    deviations = features[fit] - means[np.searchsorted(names, sources[fit])]
    _, sv, vt = np.linalg.svd(deviations, full_matrices=False)
    k = min(components, len(deviations) - 1)
    axes, scale = vt[:k], sv[:k] / np.sqrt(len(deviations) - 1)
    return np.min([((((features - m) @ axes.T) / scale) ** 2).mean(axis=1) for m in means], axis=0)


def abstentions_by_split(abstained: np.ndarray, splits: np.ndarray, kinds: np.ndarray,
                         sources: np.ndarray, frontal: np.ndarray) -> str:
    """One line per split (val, test): abstained/images of each non-frontal kind, then of each
    frontal source."""
    lines = []
    for split in ("val", "test"):
        here = splits == split
        groups = [(k, here & (kinds == k)) for k in np.unique(kinds[here & ~frontal])]
        groups += [(s, here & frontal & (sources == s)) for s in np.unique(sources[here & frontal])]
        lines.append(f"  {split}: " + ", ".join(f"{label} {int(abstained[g].sum())}/{int(g.sum())}"
                                                for label, g in groups))
    return "\n".join(lines)


def shipped_recipe(name: str, features: np.ndarray, stats: np.ndarray, classes: np.ndarray,
                   splits: np.ndarray, kinds: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """Fit the shipped recipe on the train split (64 axes, thresholds at 0.5% of validation
    radiographs), print its thresholds and abstentions per split; returns what it abstains on."""
    train, frontal = splits == "train", classes == "frontal"
    val_frontal = (splits == "val") & frontal
    gate = make_gate(fit_arrays(features[train], stats[train], classes[train], COMPONENTS))
    probabilities, distance = gate.scores(features, stats)
    p_frontal = probabilities[:, CLASSES.index("frontal")]
    min_frontal, max_distance = thresholds_for(p_frontal[val_frontal], distance[val_frontal])
    flat = stats[:, STAT_NAMES.index("std")] < FLAT_STD
    abstained = flat | (p_frontal < min_frontal) | (distance > max_distance)
    print(f"== {name}: P(frontal) >= {min_frontal:.4f}, distance <= {max_distance:.3f}")
    print(abstentions_by_split(abstained, splits, kinds, sources, frontal), flush=True)
    return abstained


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from ml.artifact import read_metadata
    from ml.training.gate_data import KIND_CLASS, all_samples

    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_variants",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--cache", type=Path, help="features cache (as ml.training.gate's)")
    args = parser.parse_args(argv)
    cache = args.cache or Path("bench/out") / f"gate-{read_metadata(args.model).model_version}.npz"
    samples = all_samples(args.model, args.cxr, args.ood, keep_sources=TRAIN_ONLY_SOURCES)
    data = extract(samples, args.model, cache)
    features, stats = data["features"], data["stats"]
    splits = np.array([gate_split(s) for s in samples])
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds, sources = np.array([s.kind for s in samples]), np.array([s.source for s in samples])
    train, frontal = splits == "train", classes == "frontal"
    val_frontal = (splits == "val") & frontal
    flat = stats[:, STAT_NAMES.index("std")] < FLAT_STD

    at = CLASSES.index("frontal")
    shipped = make_gate(fit_arrays(features[train], stats[train], classes[train], COMPONENTS))
    probabilities, distance = shipped.scores(features, stats)
    z, _ = shipped.inputs(features, stats)
    fit = train & frontal
    centroids = np.stack([z[fit & (sources == n)].mean(axis=0) for n in np.unique(sources[fit])])
    no_stats = np.zeros_like(stats)
    lean = make_gate(fit_arrays(features[train], no_stats[train], classes[train], COMPONENTS))
    variants = {
        "shipped": (probabilities[:, at], distance),
        "centroids": (probabilities[:, at], nearest_centroid(z, centroids)),
        "within-source": (probabilities[:, at], within_source(features, fit, sources)),
        "features-only": (lean.scores(features, no_stats)[0][:, at], distance),
    }
    for name, (p_frontal, d) in variants.items():
        min_frontal, max_distance = thresholds_for(p_frontal[val_frontal], d[val_frontal])
        abstained = flat | (p_frontal < min_frontal) | (d > max_distance)
        print(f"== {name}: P(frontal) >= {min_frontal:.4f}, distance <= {max_distance:.3f}")
        print(abstentions_by_split(abstained, splits, kinds, sources, frontal))
    score = energy(data["probability"])
    for split in ("val", "test"):
        here = splits == split
        row = []
        for k in np.unique(kinds[here & ~frontal]):
            pair = here & (frontal | (kinds == k))
            row.append(f"{k} {auroc(kinds[pair] == k, score[pair]):.3f}")
        print(f"energy score AUROC, radiographs against each kind, {split}: " + ", ".join(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
