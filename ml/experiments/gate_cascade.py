"""`python -m ml.experiments.gate_cascade --model M`: may the classifier's own features clear the
typical radiograph, so that the gate's network runs only on the rest?

The served gate reads a network of its own (EfficientNet-Lite0 at 128 px), which is most of its
cost. The classifier's pooled features come with every forward pass for free; a gate fitted on
them alone (the first gate) missed a few lateral films and CT reconstructions, but most
radiographs sit deep inside its "frontal" region. The cascade: a screen on the classifier's
features accepts an image outright when its P(frontal) and distance are both far on the safe
side of every non-frontal image of the train and validation splits (out-of-fold, 5 folds grouped
by patient or base image); everything else is judged by the served gate as now. Tags and flat
images still decide first for every image.

Reports, on the test split: each kind's abstentions and each source's radiographs', served gate
against cascade, and the share of images the screen clears (whose network run is saved).
Thresholds never see the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ml.artifact import read_metadata
from ml.backends import usable_cpus
from ml.gate import FLAT_STD, STAT_NAMES, Gate
from ml.training.gate import (
    CLASSES,
    CV_FOLDS,
    TRAIN_ONLY_SOURCES,
    extract,
    fit_arrays,
    gate_split,
    inverted_pairs,
    make_gate,
    network_features,
    out_of_fold,
)
from ml.training.gate_data import KIND_CLASS, all_samples, cv_folds, cv_groups

FRONTAL = CLASSES.index("frontal")


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-12, 1 - 1e-12)
    return np.log(p) - np.log1p(-p)


def accept_rule(p: np.ndarray, d: np.ndarray, radiograph: np.ndarray, margin: float,
                quantiles: np.ndarray) -> tuple[float, float, float]:
    """(min logit P(frontal), max distance, share of radiographs cleared): over distance limits at
    the radiographs' quantiles, the P(frontal) limit sits `margin` (in logits) above every
    non-radiograph within that distance; the limit pair clearing most radiographs wins."""
    best = (np.inf, 0.0, 0.0)
    lp = logit(p)
    for q in quantiles:
        max_d = float(np.quantile(d[radiograph], q))
        near = ~radiograph & (d <= max_d)
        min_lp = (float(lp[near].max()) if near.any() else -np.inf) + margin
        cleared = float(((lp >= min_lp) & (d <= max_d))[radiograph].mean())
        if cleared > best[2]:
            best = (min_lp, max_d, cleared)
    return best


def evaluate(reads: str, margin: float, p_oof: np.ndarray, d_oof: np.ndarray, p_screen: np.ndarray,
             distance: np.ndarray, served: np.ndarray, flat: np.ndarray, scored: np.ndarray,
             radiograph: np.ndarray, splits: np.ndarray, kinds: np.ndarray, sources: np.ndarray,
             quantiles: np.ndarray) -> dict:
    """One screen and margin: its limits from the out-of-fold scores, its effect on test."""
    test = splits == "test"
    min_lp, max_d, cleared_cv = accept_rule(p_oof[scored], d_oof[scored], radiograph[scored],
                                            margin, quantiles)
    cleared = (logit(p_screen) >= min_lp) & (distance <= max_d) & ~flat
    cascade = np.where(cleared, False, served)
    row = {"reads": reads, "margin_logits": margin, "min_logit_frontal": min_lp,
           "max_distance": max_d, "cleared_radiographs_out_of_fold": cleared_cv, "kinds": {},
           "sources": {}}
    for kind in sorted(set(kinds[test])):
        m = test & (kinds == kind)
        row["kinds"][kind] = {"n": int(m.sum()), "served": int(served[m].sum()),
                              "cascade": int(cascade[m].sum()), "cleared": int(cleared[m].sum())}
    for source in sorted(set(sources[test & radiograph])):
        m = test & radiograph & (sources == source)
        row["sources"][source] = {"n": int(m.sum()), "served": int(served[m].sum()),
                                  "cascade": int(cascade[m].sum()), "cleared": int(cleared[m].sum())}
    row["test_radiographs_cleared"] = float(cleared[test & radiograph].mean())
    row["val_nonradiographs_cleared"] = int((cleared & (splits == "val") & ~radiograph).sum())
    row["test_nonradiographs_cleared"] = int((cleared & test & ~radiograph).sum())
    print(f"{reads}, margin {margin}: logit P(frontal) >= {min_lp:.2f}, distance <= {max_d:.3f}; "
          f"radiographs cleared out-of-fold {cleared_cv:.1%}, test "
          f"{row['test_radiographs_cleared']:.1%}; non-radiographs cleared: val "
          f"{row['val_nonradiographs_cleared']}, test {row['test_nonradiographs_cleared']}")
    for kind, k in row["kinds"].items():
        print(f"  {kind:14s} n={k['n']:4d} abstained served {k['served']:4d} cascade "
              f"{k['cascade']:4d} cleared {k['cleared']:4d}")
    for source, k in row["sources"].items():
        print(f"  {source:26s} n={k['n']:4d} abstained served {k['served']:3d} cascade "
              f"{k['cascade']:3d} cleared {k['cleared']:4d}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml.experiments.gate_cascade",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="artifact with the served gate")
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--cache", type=Path, help="features cache (as ml.training.gate's)")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    meta = read_metadata(args.model)
    cache = args.cache or Path("bench/out") / f"gate-{meta.model_version}.npz"
    gate = Gate.load(args.model, meta, threads=usable_cpus())
    if gate is None or gate.extractor is None:
        parser.error("the artifact's gate has no network of its own: nothing to save")
    samples = all_samples(args.model, args.cxr, args.ood, train_fraction=1.0,
                          keep_sources=TRAIN_ONLY_SOURCES)
    samples += inverted_pairs([s for s in samples if s.kind == "frontal" and gate_split(s) == "train"])
    data = extract(samples, args.model, cache)  # the classifier's pooled features
    own = network_features(args.model, gate.extractor.info, samples, cache, usable_cpus())

    splits = np.array([gate_split(s) for s in samples])
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    kinds = np.array([s.kind for s in samples])
    sources = np.array([s.source for s in samples])
    radiograph = kinds == "frontal"
    inverses = kinds == "inverse"
    train, pool = splits == "train", splits != "test"
    flat = data["stats"][:, STAT_NAMES.index("std")] < FLAT_STD

    served = np.array([a.reason is not None for a in gate.assess(own, data["stats"],
                                                                 [None] * len(samples))])
    folds = cv_folds(cv_groups(samples, args.cxr, args.ood), CV_FOLDS)
    quantiles = np.linspace(0.3, 0.995, 140)
    scored = pool & ~inverses  # the fit's own inversions are not inputs anyone uploads
    results = []
    # The screen reads the classifier's features with the image statistics, or without them
    # (then it can run inside the forward pass, before the statistics are taken).
    # The radiographs' inversions fit only the polarity model, which reads the statistics; a
    # screen without them leaves the inversions out of its fit altogether.
    for reads in ("features+stats", "features"):
        with_stats = reads == "features+stats"
        stats = data["stats"] if with_stats else np.zeros_like(data["stats"])
        polarity = inverses if with_stats else None
        fit = train if with_stats else train & ~inverses
        screen = make_gate(fit_arrays(data["features"][fit], stats[fit], classes[fit],
                                      inverses=None if polarity is None else polarity[fit]))
        probabilities, distance = screen.scores(data["features"], stats)
        p_screen = probabilities[:, FRONTAL]
        p_oof, d_oof = out_of_fold({"features": data["features"], "stats": stats}, classes,
                                   pool if with_stats else pool & ~inverses, pool, folds,
                                   inverses=polarity)
        for margin in args.margins:
            results.append(evaluate(reads, margin, p_oof, d_oof, p_screen, distance, served, flat,
                                    scored, radiograph, splits, kinds, sources, quantiles))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": meta.model_version, "gate": gate.version,
                                        "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
