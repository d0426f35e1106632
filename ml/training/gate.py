"""`python -m ml.training.gate --model DIR`: fit the input gate on the model's features, pick its
thresholds without the test split (on validation, or by a patient-grouped cross-validation over
train and validation), measure it on test, and write gate.json + gate.npz into DIR.

The gate (ml/gate.py) has two parts fitted here: a Mahalanobis distance in the
whitened principal subspace of the training radiographs' pooled features, and a
multinomial logistic regression over those whitened features and the image
statistics, which names the kind of non-frontal input. Test images only report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import read_metadata, sha256_file
from ml.gate import GATE_FORMAT, INT8_VARIANT, STAT_NAMES, Gate, gate_files, image_statistics
from ml.training.gate_data import (
    KIND_CLASS,
    Sample,
    all_samples,
    cv_folds,
    cv_groups,
    inverted_pairs,
    split_of,
)

CLASSES = ("frontal", "lateral", "ct", "other", "inverted", "poor")
CLASS_REASONS = {"lateral": "not_frontal", "ct": "other_modality", "other": "not_chest_xray",
                 "inverted": "inverted", "poor": "poor_quality"}
# Sources without patient ids are train-only in the model's split; part of them is kept
# out of the gate's fit so that every source has held-out frontal images to report.
TRAIN_ONLY_SOURCES = ("covid-cxnet", "twitter-covid")
FRONTAL_ABSTAIN_TARGET = 0.005  # per threshold, on validation radiographs
# How the thresholds meet that target on validation radiographs: over all of them pooled, or
# in every source separately (the targets are per source: a pooled rule lets a small source's
# images be the ones abstained on). "cross-validated": on out-of-fold scores of every
# radiograph of the train and validation splits (5 folds grouped by patient), in every source,
# at CV_TARGET each: a small source's 35 validation images cannot place a 0.5% threshold, its
# 200 out-of-fold images can place a 2% one (docs/experiments/gate, sixth session).
THRESHOLD_RULES = ("pooled", "per-source", "cross-validated")
CV_TARGET = 0.02
CV_FOLDS = 5
POLARITY_C = 1.0  # the polarity model's inverse regularisation (0.1 and 10 measured alike)


def gate_split(sample: Sample, val_for_train_only: bool = False) -> str:
    """The split a sample plays for the gate (the model's split, except train-only sources,
    which give test images and, with val_for_train_only, validation images too)."""
    if sample.kind == "frontal" and sample.source in TRAIN_ONLY_SOURCES:
        split = split_of(sample.key)
        return split if split == "test" or (split == "val" and val_for_train_only) else "train"
    return sample.split


def gate_splits(samples: Sequence[Sample], rule: str = "pooled") -> list[str]:
    """Every sample's gate_split under a threshold rule (per-source: train-only sources give
    validation images too, so that every source has some)."""
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; known: {THRESHOLD_RULES}")
    return [gate_split(s, val_for_train_only=rule == "per-source") for s in samples]


def extract(samples: Sequence[Sample], model_dir: Path, cache: Path, backend: str = "onnx",
            batch_size: int = 32) -> dict[str, np.ndarray]:
    """Features, statistics and COVID probability per sample, cached by key in an npz.

    backend onnx or onnx-int8 runs the export itself, without the artifact's gate (which may be
    the thing being fitted, or may refuse the int8 variant's features)."""

    done: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    if cache.is_file():
        with np.load(cache) as npz:  # each npz[name] reads the whole array again: read once
            keys, features, stats, probability = (npz[k] for k in ("keys", "features", "stats",
                                                                   "probability"))
        for i, key in enumerate(keys):
            done[str(key)] = (features[i], stats[i], float(probability[i]))
    todo = [s for s in samples if s.key not in done]
    if todo:
        engine, prepare = _engine(model_dir, backend)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded = [s.load() for s in chunk]
            out = engine.forward(prepare([p for p, _ in loaded]), False)
            for s, (pixels, attrs), f, p in zip(chunk, loaded, out.features, out.probability,
                                                strict=True):
                done[s.key] = (f, image_statistics(pixels, attrs), float(p))
            if start // batch_size % 10 == 9 or start + batch_size >= len(todo):
                _save_cache(cache, done)
                print(f"features: {len(done)} of {len(samples)}", flush=True)
    keys = [s.key for s in samples]
    return {"features": np.stack([done[k][0] for k in keys]),
            "stats": np.stack([done[k][1] for k in keys]),
            "probability": np.array([done[k][2] for k in keys])}


def _engine(model_dir: Path, backend: str) -> tuple[Any, Callable[[list[np.ndarray]], np.ndarray]]:
    """The backend's forward pass and the artifact's preprocessing."""
    from ml.predictor import Predictor

    if backend in ("onnx", "onnx-int8"):
        from ml.backends import OnnxBackend
        from ml.preprocess import preprocess_batch

        meta = read_metadata(model_dir)
        engine = OnnxBackend.load(model_dir, meta, int8=backend == "onnx-int8")
        return engine, lambda pixels: preprocess_batch(pixels, size=meta.input_size,
                                                       version=meta.preprocess_version)
    predictor = Predictor.load(model_dir, backend=backend)
    return predictor.backend, predictor.preprocess


def extract_own_features(samples: Sequence[Sample], extractor: Any, model_dir: Path, cache: Path,
                         batch_size: int = 32) -> np.ndarray:
    """The gate's own feature network's output per sample (ml.gate_features), on the
    classifier's input batch as served, cached by key in an npz named after the network."""
    from ml.preprocess import preprocess_batch

    meta = read_metadata(model_dir)
    done: dict[str, np.ndarray] = {}
    if cache.is_file():
        with np.load(cache) as npz:
            done = {str(k): f for k, f in zip(npz["keys"], npz["features"], strict=True)}
    todo = [s for s in samples if s.key not in done]
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        batch = preprocess_batch([s.load()[0] for s in chunk], size=meta.input_size,
                                 version=meta.preprocess_version)
        for s, f in zip(chunk, extractor(batch), strict=True):
            done[s.key] = f
        if start // batch_size % 10 == 9 or start + batch_size >= len(todo):
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, keys=np.array(list(done)), features=np.stack(list(done.values())))
            print(f"gate features: {len(done)} of {len(samples)}", flush=True)
    return np.stack([done[s.key] for s in samples])


def own_features(model_dir: Path, samples: Sequence[Sample], cache: Path, size: int,
                 threads: int = 1) -> tuple[dict, np.ndarray]:
    """The gate's own network (ml.gate_features) run on every sample: its block for gate.json and
    the features, cached beside `cache` under the network's sha256. A refit keeps the network
    the artifact already has at this size (its export is not byte-for-byte reproducible, and a
    gate must read the network it is served with); otherwise it is exported into model_dir."""
    from ml.gate_features import SOURCE, export

    block = shipped_network(model_dir)
    if block is None or block.get("source") != SOURCE or block.get("input_size") != size:
        block = export(model_dir, size)
    return block, network_features(model_dir, block, samples, cache, threads)


def network_features(model_dir: Path, block: dict, samples: Sequence[Sample], cache: Path,
                     threads: int = 1) -> np.ndarray:
    """The network a gate.json features block names, run on every sample, cached beside `cache`
    under the network's sha256."""
    from ml.gate_features import GateFeatures

    extractor = GateFeatures.load(model_dir, block, threads=threads)
    own_cache = cache.with_name(f"{cache.stem}-gate-features-{block['sha256'][:12]}.npz")
    return extract_own_features(samples, extractor, model_dir, own_cache)


def shipped_network(model_dir: Path) -> dict | None:
    """The features block of the artifact's gate.json when its network file is there intact."""
    path = Path(model_dir) / gate_files()[0]
    if not path.is_file():
        return None
    block = json.loads(path.read_text()).get("features")
    if not block or not (Path(model_dir) / str(block.get("file"))).is_file():
        return None
    return block if sha256_file(Path(model_dir) / block["file"]) == block.get("sha256") else None


def _save_cache(cache: Path, done: dict) -> None:
    keys = list(done)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, keys=np.array(keys), features=np.stack([done[k][0] for k in keys]),
             stats=np.stack([done[k][1] for k in keys]),
             probability=np.array([done[k][2] for k in keys]))


def fit_arrays(features: np.ndarray, stats: np.ndarray, classes: Sequence[str],
               components: int = 64, c: float = 0.1, seed: int = 0,
               sample_weight: np.ndarray | None = None, shrink: float = 0.0,
               axes_rows: np.ndarray | None = None,
               inverses: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Principal axes of the frontal features, statistic scales and the classifier's weights
    (sample_weight: per image, multiplying the classes' balancing weights; shrink: added to each
    axis' variance, as a fraction of the axes' mean variance, so that the narrowest axes do not
    dominate the distance; axes_rows: which frontal rows the axes and distance are fitted on,
    default all). inverses: the rows that are the inversions of radiographs (gate_data.
    inverted_pairs); they fit only the polarity model ("polarity": its weights over the
    standardised statistics, then its bias), radiographs against them."""
    from sklearn.linear_model import LogisticRegression

    classes = np.asarray(classes)
    if inverses is not None and inverses.any():
        polarity_x = np.concatenate([stats[(classes == "frontal") & ~inverses], stats[inverses]])
        polarity_y = np.r_[np.zeros(len(polarity_x) - int(inverses.sum())), np.ones(int(inverses.sum()))]
        keep = ~inverses
        features, stats, classes = features[keep], stats[keep], classes[keep]
        sample_weight = None if sample_weight is None else sample_weight[keep]
        axes_rows = None if axes_rows is None else axes_rows[keep]
    else:
        polarity_x = None
    frontal = features[(classes == "frontal") & (True if axes_rows is None else axes_rows)]
    mean = frontal.mean(axis=0)
    _, sv, vt = np.linalg.svd(frontal - mean, full_matrices=False)
    k = min(components, len(frontal) - 1)
    variance = sv[:k] ** 2 / (len(frontal) - 1)
    scale = np.sqrt(variance + shrink * variance.mean())
    stat_mean, stat_scale = stats.mean(axis=0), stats.std(axis=0) + 1e-6
    x = np.concatenate([((features - mean) @ vt[:k].T) / scale, (stats - stat_mean) / stat_scale], 1)
    # Fitted on the whitened axes as they are: rescaling each column to unit variance (non-frontal
    # images lie far out on them) weakens the penalty there and measured worse on validation
    # (lateral X-rays 83% -> 33% abstained at the same frontal rate).
    model = LogisticRegression(C=c, class_weight="balanced", max_iter=5000, random_state=seed)
    model.fit(x, classes, sample_weight=sample_weight)
    order = [list(model.classes_).index(name) for name in CLASSES]
    arrays = {"feature_mean": mean, "components": vt[:k], "component_scale": scale,
              "stat_mean": stat_mean, "stat_scale": stat_scale,
              "weights": model.coef_[order], "bias": model.intercept_[order]}
    if polarity_x is not None:
        polarity = LogisticRegression(C=POLARITY_C, max_iter=5000, random_state=seed).fit(
            (polarity_x - stat_mean) / stat_scale, polarity_y)
        arrays["polarity"] = np.r_[polarity.coef_[0], polarity.intercept_]
    return arrays


def out_of_fold(data: dict[str, np.ndarray], classes: np.ndarray, fit: np.ndarray,
                scored: np.ndarray, fold: np.ndarray, components: int = 64, c: float = 0.1,
                **fit_options: Any) -> tuple[np.ndarray, np.ndarray]:
    """P(frontal) and distance of every `scored` sample from a gate fitted on the `fit` samples
    of the other folds (zeros elsewhere); array options (sample_weight) are per sample."""
    p_frontal, distance = np.zeros(len(classes)), np.zeros(len(classes))
    features, stats = data["features"], data["stats"]
    for k in np.unique(fold[scored]):
        train, held = fit & (fold != k), scored & (fold == k)
        options = {key: v[train] if isinstance(v, np.ndarray) else v for key, v in fit_options.items()}
        arrays = fit_arrays(features[train], stats[train], classes[train], components, c, **options)
        probabilities, d = make_gate(arrays).scores(features[held], stats[held])
        p_frontal[held], distance[held] = probabilities[:, CLASSES.index("frontal")], d
    return p_frontal, distance


def make_gate(arrays: dict[str, np.ndarray], min_frontal: float = 0.5,
              max_distance: float = np.inf) -> Gate:
    """A Gate from fitted arrays and thresholds (before it is written)."""
    a = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    return Gate("unsaved", CLASSES, dict(CLASS_REASONS), min_frontal, max_distance, a["feature_mean"],
                a["components"], a["component_scale"], a["stat_mean"], a["stat_scale"],
                a["weights"], a["bias"], {}, polarity=a.get("polarity"))


def choose_thresholds(gate: Gate, features: np.ndarray, stats: np.ndarray,
                      target: float = FRONTAL_ABSTAIN_TARGET,
                      sources: np.ndarray | None = None) -> tuple[float, float]:
    """On validation radiographs: each threshold abstains on at most `target` of them, or, given
    each image's source, on at most `target` of every source's (the loosest source decides)."""
    probabilities, distances = gate.scores(features, stats)
    return thresholds_for(probabilities[:, CLASSES.index("frontal")], distances, target, sources)


def thresholds_for(frontal: np.ndarray, distances: np.ndarray,
                   target: float = FRONTAL_ABSTAIN_TARGET,
                   sources: np.ndarray | None = None) -> tuple[float, float]:
    """choose_thresholds on scores already computed (P(frontal) and distance per radiograph)."""
    groups = [np.ones(len(frontal), bool)] if sources is None else [
        sources == name for name in np.unique(sources)]
    min_frontal = min(float(np.quantile(frontal[g], target)) for g in groups)
    max_distance = max(float(np.quantile(distances[g], 1.0 - target)) for g in groups)
    return min(0.5, min_frontal), max_distance


def write_gate(model_dir: Path, arrays: dict[str, np.ndarray], thresholds: tuple[float, float],
               summary: dict, rule: str = "pooled", variant: str = "",
               features: dict | None = None) -> dict:
    """gate.npz, then gate.json (which names the npz's sha256 and the weights it belongs to);
    variant "int8": the int8 variant's own, bound to its export file and serving version;
    features: the gate's own feature network (ml.gate_features.export's block), else it reads
    the classifier's pooled features."""
    meta = read_metadata(model_dir)
    json_name, arrays_name = gate_files(variant)
    path = model_dir / arrays_name
    np.savez(path, **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    sha = sha256_file(path)
    bound: dict[str, Any] = {"model_version": meta.model_version}
    if variant:
        from ml.backends import INT8_INFO_FILE, read_onnx_info, serving_terms

        export = read_onnx_info(model_dir, meta, INT8_INFO_FILE)
        bound = {"model_version": serving_terms(meta, export)[1], "variant": variant,
                 "engine_sha256": export["sha256"]}
    info = {
        "format": GATE_FORMAT,
        "version": f"gate-1-{sha[:8]}",
        **bound,
        "weights_sha256": meta.weights_sha256,
        "arrays_sha256": sha,
        "feature_source": (
            "pooled backbone output (input of head_dropout)" if features is None
            else f"{features['source']} at {features['input_size']} px ({features['file']})")
        + f", whitened on {arrays['components'].shape[0]} principal axes of training radiographs",
        "features": features,
        "image_statistics": list(STAT_NAMES),
        "polarity": None if "polarity" not in arrays else (
            "logistic regression over the standardised image statistics (gate.npz 'polarity': "
            "weights, then bias), fitted on training radiographs beside their own inversions; "
            "its log-odds, where negative, are added to the 'inverted' class's logit"),
        "classes": list(CLASSES),
        "class_reasons": CLASS_REASONS,
        "thresholds": {"min_frontal_probability": thresholds[0], "max_distance": thresholds[1],
                       "chosen_on": (
                           "validation split" if rule != "cross-validated" else
                           f"out-of-fold scores of the train and validation splits ({CV_FOLDS} "
                           "folds grouped by patient or base image)"),
                       "frontal_abstain_target_each": (
                           CV_TARGET if rule == "cross-validated" else FRONTAL_ABSTAIN_TARGET),
                       "rule": rule},
        "summary": summary,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (model_dir / json_name).write_text(json.dumps(info, indent=2) + "\n")
    return info


def fit_gate(model_dir: Path, samples: Sequence[Sample], data: dict[str, np.ndarray],
             components: int = 64, c: float = 0.1, distance_margin: float = 1.0,
             rule: str = "pooled", variant: str = "", features: dict | None = None,
             groups: np.ndarray | None = None) -> tuple[Gate, dict]:
    """Fit on train, thresholds on val (the cross-validated rule: on out-of-fold scores of train
    and val); returns the written gate (loaded back) and its info.

    distance_margin multiplies the distance threshold (1 for served models; more for the
    tiny test models, whose validation set is a handful of images). rule: THRESHOLD_RULES
    ("cross-validated" needs each sample's patient or base-image group, gate_data.cv_groups);
    variant "int8": the int8 variant's own gate, on its features (data)."""
    splits = np.array(gate_splits(samples, rule))
    classes = np.array([KIND_CLASS[s.kind] for s in samples])
    sources = np.array([s.source for s in samples])
    radiograph = np.array([s.kind == "frontal" for s in samples])  # not made ones (experiments)
    inverses = np.array([s.kind == "inverse" for s in samples])  # for the polarity model only
    train, val = splits == "train", (splits == "val") & radiograph
    arrays = fit_arrays(data["features"][train], data["stats"][train], classes[train], components, c,
                        inverses=inverses[train])
    summary: dict[str, Any] = {
        "fit_images_per_class": {k: int(((classes == k) & train & ~inverses).sum())
                                 for k in CLASSES},
        "polarity_pairs": int((train & inverses).sum()),
        "val_frontal_images": int(val.sum()), "components": int(arrays["components"].shape[0]),
        "C": c, "distance_margin": distance_margin}
    if rule == "cross-validated":
        if groups is None:
            raise ValueError("the cross-validated rule needs each sample's group")
        pool = splits != "test"
        p_frontal, distance = out_of_fold(data, classes, pool, pool, cv_folds(groups, CV_FOLDS),
                                          components, c, inverses=inverses)
        scored = pool & radiograph
        min_frontal, max_distance = thresholds_for(p_frontal[scored], distance[scored], CV_TARGET,
                                                   sources[scored])
        summary["cross_validation"] = {"folds": CV_FOLDS, "radiographs": int(scored.sum()),
                                       "images": int((pool & ~inverses).sum())}
    else:
        min_frontal, max_distance = choose_thresholds(
            make_gate(arrays), data["features"][val], data["stats"][val],
            sources=sources[val] if rule == "per-source" else None)
    thresholds = (min_frontal, max_distance * distance_margin)
    info = write_gate(model_dir, arrays, thresholds, summary, rule, variant, features)
    gate = Gate.load(model_dir, read_metadata(model_dir), variant, info.get("engine_sha256"))
    assert gate is not None
    return gate, info


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from ml.evaluation.gate_report import write_report

    parser = argparse.ArgumentParser(prog="python -m ml.training.gate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model artifact (gets gate files)")
    parser.add_argument("--cxr", type=Path, default=Path("../shared/data/cxr"))
    parser.add_argument("--ood", type=Path, default=Path("../shared/data/ood"))
    parser.add_argument("--report", type=Path, default=Path("docs/experiments/gate"))
    parser.add_argument("--cache", type=Path, help="features cache (default: bench/out/gate-<model>.npz)")
    parser.add_argument("--backend", default="onnx", choices=["onnx", "keras", "onnx-int8"],
                        help="onnx-int8: fit the int8 variant's own gate (gate.int8.json) on its "
                        "features, for a variant that is a model of its own")
    parser.add_argument("--features", choices=["classifier", "imagenet-lite0"], default="classifier",
                        help="what the gate reads: the classifier's pooled features, or a network "
                        "of its own (EfficientNet-Lite0 with ImageNet weights, written into the "
                        "artifact as gate_features.onnx; serves the int8 variant too)")
    parser.add_argument("--features-size", type=int, default=128,
                        help="input size of the gate's own network (default: %(default)s)")
    parser.add_argument("--components", type=int, default=64)
    parser.add_argument("--C", type=float, default=0.1, dest="c")
    parser.add_argument("--min-per-source", type=int, default=0,
                        help="training radiographs each source gives at least (default: 25%% of all)")
    parser.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default="pooled",
                        help="thresholds meet their abstention target on validation radiographs "
                        "pooled, in every source, or in every source of the train and validation "
                        "splits' out-of-fold scores (cross-validated, 2%% each; "
                        "default: %(default)s)")
    parser.add_argument("--train-fraction", type=float, default=0.25,
                        help="share of the model's training radiographs the gate fits on "
                        "(default: %(default)s; 1 for a gate with a network of its own, which "
                        "never saw them)")
    parser.add_argument("--polarity", action="store_true",
                        help="fit a polarity model too, on each training radiograph beside its own "
                        "inversion (gate_data.inverted_pairs): its log-odds join the 'inverted' class")
    parser.add_argument("--report-only", action="store_true",
                        help="refit nothing: measure the artifact's own gate with the code served "
                        "now and write its report (give the fit's --polarity and --threshold-rule, "
                        "so that the same images are read and split as when it was fitted)")
    parser.add_argument("--quick", action="store_true",
                        help="development/test models: fit on a small set in a minute, no report")
    args = parser.parse_args(argv)
    if args.quick:
        from ml.training.gate_quick import fit_quick_gate

        quick_backend = "onnx-int8" if args.backend == "onnx-int8" else "keras"
        fit_quick_gate(args.model, args.cxr, args.ood, backend=quick_backend)
        variant = INT8_VARIANT if quick_backend == "onnx-int8" else ""
        print(f"wrote a quick (development only) gate to {args.model / gate_files(variant)[0]}")
        return 0
    if args.features != "classifier" and args.backend == "onnx-int8":
        parser.error("a gate with its own feature network serves the int8 variant as it is: "
                     "fit it once, without --backend onnx-int8")
    meta = read_metadata(args.model)
    variant = INT8_VARIANT if args.backend == "onnx-int8" else ""
    suffix = f"+{variant}" if variant else ""
    cache = args.cache or Path("bench/out") / f"gate-{meta.model_version}{suffix}.npz"
    if args.report_only:  # before reading thousands of images
        engine_sha256 = None
        if variant:
            from ml.backends import INT8_INFO_FILE, read_onnx_info

            engine_sha256 = read_onnx_info(args.model, meta, INT8_INFO_FILE)["sha256"]
        gate = Gate.load(args.model, meta, variant, engine_sha256)
        if gate is None:
            parser.error(f"{args.model} has no input gate to measure")
    samples = all_samples(args.model, args.cxr, args.ood, train_fraction=args.train_fraction,
                          keep_sources=TRAIN_ONLY_SOURCES, min_per_source=args.min_per_source)
    bases = [s for s in samples if s.kind == "frontal" and gate_split(s) == "train"]
    if args.polarity:
        samples += inverted_pairs(bases)
    data = extract(samples, args.model, cache, backend=args.backend)
    features = None
    if args.report_only:
        from ml.backends import usable_cpus

        if gate.extractor is not None:
            block = gate.extractor.info
            data = {**data, "features": network_features(args.model, block, samples, cache,
                                                          usable_cpus())}
        report = write_report(args.report, gate, samples, data,
                              gate_splits(samples, args.threshold_rule))
        print(f"measured {gate.version} as served now: {report}")
        return 0
    if args.features != "classifier":
        from ml.backends import usable_cpus

        features, own = own_features(args.model, samples, cache, args.features_size, usable_cpus())
        data = {**data, "features": own}
    groups = (cv_groups(samples, args.cxr, args.ood) if args.threshold_rule == "cross-validated"
              else None)
    gate, info = fit_gate(args.model, samples, data, args.components, args.c,
                          rule=args.threshold_rule, variant=variant, features=features,
                          groups=groups)
    report = write_report(args.report, gate, samples, data,
                          gate_splits(samples, args.threshold_rule))
    print(f"wrote {args.model / gate_files(variant)[0]} ({info['version']}) and {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
