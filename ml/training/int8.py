"""The int8 variant of a model artifact: made from its float32 ONNX export, measured against it on
validation, and described in model.int8.onnx.json (`python -m ml.export DIR --int8 --manifest CSV`).

Calibration images come from the training split only; parity is measured on the
validation split (never test): probabilities (AUROC change, labels at the
artifact's threshold, |delta p|), the CAMs, the pooled features and the input
gate's decisions (validation radiographs, plus the gate's other validation kinds
when the OOD set is given). A variant that meets every target serves
interchangeably with float32. One that does not is a model of its own: its
threshold is chosen on validation like any model's (same target sensitivity) and
it serves under the version "<model_version>+int8", so its probabilities never
share a series with the float32 model's (see ml.backends.serving_terms).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from ml.artifact import ModelMetadata, read_metadata, sha256_file
from ml.backends import INT8_FILE, INT8_INFO_FILE, ONNX_FILE, read_onnx_info
from ml.gate import Gate, image_statistics
from ml.overlay import normalise_maps
from ml.preprocess import preprocess_gray, to_caffe
from ml.training.quantize import OUTPUT_NAMES, Recipe, quantise

INT8_SUFFIX = "+int8"


@dataclass(frozen=True)
class Targets:
    """What "same model" means: the issue's bars, checked on validation."""

    max_auroc_change: float = 0.005
    min_label_agreement: float = 0.99
    max_abs_delta_p99: float = 0.02
    min_cam_correlation_p01: float = 0.90  # 1st percentile over images of corr(raw CAM fp32, int8)
    max_gate_changes: int = 0


@dataclass
class Images:
    """Decoded images of one split: model inputs (grey, preprocessed), labels, gate inputs."""

    gray: np.ndarray  # (N, size, size) float32 in [0, 255]
    targets: np.ndarray
    stats: np.ndarray  # (N, len(STAT_NAMES))
    attributes: list[dict[str, Any]]
    kinds: list[str]


def load_images(paths: Sequence[Path], targets: Sequence[int], meta: ModelMetadata,
                kinds: Sequence[str] | None = None) -> Images:
    """Decode and preprocess each file once (as serving does), keeping the gate's statistics."""
    from ml.imaging import decode_image

    gray = np.empty((len(paths), meta.input_size, meta.input_size), np.float32)
    stats, attributes = [], []
    for i, path in enumerate(paths):
        image = decode_image(Path(path).read_bytes())
        gray[i] = preprocess_gray(image.pixels, meta.input_size, version=meta.preprocess_version)
        stats.append(image_statistics(image.pixels, image.attributes))
        attributes.append(dict(image.attributes))
    return Images(gray, np.asarray(targets), np.stack(stats) if stats else np.zeros((0, 0)),
                  attributes, list(kinds or ["frontal"] * len(paths)))


def chunks(gray: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Model-input batches of `size` images."""
    for start in range(0, len(gray), size):
        yield to_caffe(gray[start:start + size])


def run_model(path: Path, gray: np.ndarray, batch: int = 8) -> dict[str, np.ndarray]:
    """The three outputs of an ONNX model over preprocessed grey images."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    parts: dict[str, list[np.ndarray]] = {k: [] for k in OUTPUT_NAMES}
    for x in chunks(gray, batch):
        for key, value in zip(OUTPUT_NAMES, session.run(list(OUTPUT_NAMES), {name: x}), strict=True):
            parts[key].append(value)
    out = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    out["covid_probability"] = out["covid_probability"].reshape(-1)
    return out


def _auroc(y: np.ndarray, s: np.ndarray) -> float | None:
    from ml.evaluation.metrics import auroc

    return auroc(y, s)


def compare(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], targets: np.ndarray,
            threshold: float) -> dict[str, Any]:
    """Per-image agreement of the int8 outputs with float32 (probability, labels, CAM, features)."""
    p, q = fp32["covid_probability"].astype(np.float64), int8["covid_probability"].astype(np.float64)
    delta = np.abs(q - p)
    a, b = fp32["cam"].reshape(len(p), -1), int8["cam"].reshape(len(p), -1)
    a_c, b_c = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
    norms = np.linalg.norm(a_c, axis=1) * np.linalg.norm(b_c, axis=1)
    # A map without spatial detail (1x1 at tiny input sizes) has nothing to disagree on.
    corr = np.where(norms > 1e-12, (a_c * b_c).sum(1) / np.maximum(norms, 1e-12), 1.0)
    heat = np.abs(normalise_maps(fp32["cam"]) - normalise_maps(int8["cam"])).reshape(len(p), -1).max(1)
    f, g = fp32["features"], int8["features"]
    rel = np.linalg.norm(g - f, axis=1) / np.maximum(np.linalg.norm(f, axis=1), 1e-12)
    auroc_fp32, auroc_int8 = _auroc(targets, p), _auroc(targets, q)
    return {
        "images": len(p),
        "auroc_fp32": auroc_fp32, "auroc_int8": auroc_int8,
        "auroc_change": None if auroc_fp32 is None or auroc_int8 is None else auroc_int8 - auroc_fp32,
        "label_agreement": float(((p >= threshold) == (q >= threshold)).mean()),
        "abs_delta_p99": float(np.percentile(delta, 99)), "abs_delta_max": float(delta.max()),
        "abs_delta_mean": float(delta.mean()),
        "cam_correlation_p01": float(np.percentile(corr, 1)),
        "cam_correlation_median": float(np.median(corr)),
        "heatmap_max_abs_diff_p99": float(np.percentile(heat, 99)),
        "features_rel_err_p99": float(np.percentile(rel, 99)),
        "features_rel_err_median": float(np.median(rel)),
    }


def gate_changes(gate: Gate, fp32_features: np.ndarray, int8_features: np.ndarray,
                 images: Images) -> dict[str, Any]:
    """How many of the gate's decisions (answer, or which abstain reason) int8 features change."""
    before = gate.assess(fp32_features, images.stats, images.attributes)
    after = gate.assess(int8_features, images.stats, images.attributes)
    changed: dict[str, int] = {}
    for x, y, kind in zip(before, after, images.kinds, strict=True):
        if x.reason != y.reason:
            changed[kind] = changed.get(kind, 0) + 1
    return {"gate_version": gate.version, "images": len(before), "changed": sum(changed.values()),
            "changed_by_kind": changed,
            "abstained_fp32": sum(x.reason is not None for x in before),
            "abstained_int8": sum(y.reason is not None for y in after)}


def verdict(parity: dict[str, Any], targets: Targets) -> list[str]:
    """The targets missed (empty: passed)."""
    missed = []
    change = parity["auroc_change"]
    if change is None or abs(change) > targets.max_auroc_change:
        missed.append("auroc_change")
    if parity["label_agreement"] < targets.min_label_agreement:
        missed.append("label_agreement")
    if parity["abs_delta_p99"] > targets.max_abs_delta_p99:
        missed.append("abs_delta_p99")
    if parity["cam_correlation_p01"] < targets.min_cam_correlation_p01:
        missed.append("cam_correlation_p01")
    gate = parity.get("gate")
    if gate is not None and gate["changed"] > targets.max_gate_changes:
        missed.append("gate_changes")
    return missed


def own_terms(meta: ModelMetadata, targets: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    """Threshold and validation metrics of the int8 variant as a model of its own."""
    from ml.evaluation.metrics import choose_threshold

    sensitivity = float(meta.metrics.get("target_sensitivity", 0.90))
    threshold = choose_threshold(targets, scores, sensitivity)
    predicted = scores >= threshold
    return {"model_version": meta.model_version + INT8_SUFFIX, "threshold": threshold,
            "metrics": {"split": "val", "val_images": int(len(scores)),
                        "val_auroc": _auroc(targets, scores),
                        "val_sensitivity": float(predicted[targets == 1].mean()),
                        "val_specificity": float((~predicted[targets == 0]).mean()),
                        "target_sensitivity": sensitivity}}


def build_int8(model_dir: str | Path, calibration: Images, validation: Images,
               gate_extra: Images | None = None, recipe: Recipe | None = None,
               targets: Targets | None = None) -> dict[str, Any]:
    """Quantise model_dir's ONNX export, measure it, write model.int8.onnx + json; returns the info."""
    recipe, targets = recipe or Recipe(), targets or Targets()
    model_dir = Path(model_dir)
    meta = read_metadata(model_dir)
    fp32_info = read_onnx_info(model_dir, meta)
    gray = calibration.gray[: recipe.calibration_images]
    started = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".model.int8.", suffix=".onnx")
    os.close(fd)
    try:
        done = quantise(model_dir / ONNX_FILE, Path(tmp), lambda: chunks(gray, recipe.chunk), recipe)
        fp32_out = run_model(model_dir / ONNX_FILE, validation.gray)
        int8_out = run_model(Path(tmp), validation.gray)
        parity = compare(fp32_out, int8_out, validation.targets, meta.threshold)
        gate = Gate.load(model_dir, meta)
        if gate is not None and gate.reads_classifier:  # else int8 cannot move its features
            parity["gate"] = gate_changes(gate, fp32_out["features"], int8_out["features"], validation)
            if gate_extra is not None and len(gate_extra.gray):
                extra = gate_changes(gate, run_model(model_dir / ONNX_FILE, gate_extra.gray)["features"],
                                     run_model(Path(tmp), gate_extra.gray)["features"], gate_extra)
                parity["gate"] = _merge(parity["gate"], extra)
        missed = verdict(parity, targets)
        parity.update(passed=not missed, missed=missed, targets=asdict(targets), split="val")
        serving = ({"model_version": meta.model_version, "threshold": meta.threshold} if not missed
                   else own_terms(meta, validation.targets, int8_out["covid_probability"]))
        os.chmod(tmp, 0o644)
        os.replace(tmp, model_dir / INT8_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    info = {
        "file": INT8_FILE, "sha256": sha256_file(model_dir / INT8_FILE),
        "weights_sha256": meta.weights_sha256, "model_version": meta.model_version,
        "source": {"file": ONNX_FILE, "sha256": fp32_info["sha256"]},
        "input_size": meta.input_size, "outputs": list(OUTPUT_NAMES), "precision": "int8",
        "recipe": {**recipe.to_json(), "calibration_images": int(len(gray)), "split": "train",
                   "equalised_pairs": done["equalised_pairs"], "kept_fp32": done["kept_fp32"]},
        "parity": parity, "serving": serving,
        "seconds": round(time.perf_counter() - started, 1),
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (model_dir / INT8_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    kinds = dict(a["changed_by_kind"])
    for k, v in b["changed_by_kind"].items():
        kinds[k] = kinds.get(k, 0) + v
    return {key: a[key] + b[key] for key in ("images", "changed", "abstained_fp32", "abstained_int8")
            } | {"changed_by_kind": kinds, "gate_version": a["gate_version"]}


def split_images(model_dir: Path, manifest: Path, split_file: Path, meta: ModelMetadata,
                 calibration_images: int, seed: int = 0) -> tuple[Images, Images]:
    """Calibration images (a seeded sample of the training split) and the validation split."""
    from ml.training.data import load_manifest, read_split

    split = read_split(split_file, load_manifest(manifest))
    train = list(split["train"])
    random.Random(seed).shuffle(train)
    chosen = train[:calibration_images]
    calibration = load_images([r.path for r in chosen], [r.target for r in chosen], meta)
    val = split["val"]
    return calibration, load_images([r.path for r in val], [r.target for r in val], meta)


def gate_extra_images(model_dir: Path, manifest: Path, ood_dir: Path, meta: ModelMetadata) -> Images:
    """The gate's own validation images other than radiographs (lateral, CT, photos, synthetic...)."""
    from ml.training.gate import gate_split
    from ml.training.gate_data import all_samples

    samples = [s for s in all_samples(model_dir, manifest.parent, ood_dir)
               if gate_split(s) == "val" and s.kind != "frontal"]
    gray = np.empty((len(samples), meta.input_size, meta.input_size), np.float32)
    stats, attributes = [], []
    for i, sample in enumerate(samples):
        pixels, attrs = sample.load()
        gray[i] = preprocess_gray(pixels, meta.input_size, version=meta.preprocess_version)
        stats.append(image_statistics(pixels, attrs))
        attributes.append(dict(attrs))
    return Images(gray, np.zeros(len(samples), int), np.stack(stats), attributes,
                  [s.kind for s in samples])


def export_int8(model_dir: str | Path, manifest: str | Path, split_file: str | Path | None = None,
                ood_dir: str | Path | None = None, recipe: Recipe | None = None,
                targets: Targets | None = None) -> dict[str, Any]:
    """Load the images a variant needs from the manifest and build it (see build_int8)."""
    model_dir, manifest = Path(model_dir), Path(manifest)
    meta = read_metadata(model_dir)
    recipe = recipe or Recipe()
    calibration, validation = split_images(model_dir, manifest, Path(split_file or model_dir / "split.csv"),
                                           meta, recipe.calibration_images)
    extra = None
    if ood_dir is not None and Path(ood_dir, "manifest.csv").is_file() and (model_dir / "gate.json").is_file():
        extra = gate_extra_images(model_dir, manifest, Path(ood_dir), meta)
    return build_int8(model_dir, calibration, validation, extra, recipe, targets)
